"""Where a hub checkpoint (`model.pretrained`, `anomalyclip.pretrained`) is read from, decided before a loader runs.

A local folder is used as it is. A hub id is read from the local Hugging Face cache when it is there, so a machine
that fetched it once needs no network; otherwise the hub must answer within PROBE_S. Without one, the loaders retried
for minutes and ended in a 300-line traceback; here it is one line that says how to fetch the weights once.
"""

from __future__ import annotations

import os
from pathlib import Path

PROBE_S = 5.0  # seconds the hub has to answer before it counts as unreachable


class HubUnreachable(FileNotFoundError):
    """A hub id that is neither cached locally nor reachable: the stages report it as a missing file, in one line."""


def _fetch_hint(repo_id: str, key: str) -> str:
    return (f"fetch it once where there is internet (hf download {repo_id} --local-dir <folder>) and set "
            f"{key} to that folder, or copy the Hugging Face cache (HF_HOME) here")


def resolve(pretrained: str, key: str = "model.pretrained") -> str:
    """A local folder as given; a hub id as its cached snapshot folder, or as given when the hub answers;
    HubUnreachable (one line naming `key`) otherwise."""
    if Path(pretrained).exists() or pretrained.startswith((".", "/", "~")):
        return pretrained
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(pretrained, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable(f"{key}: {pretrained} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             + _fetch_hint(pretrained, key))
    import httpx

    url = f"{os.environ.get('HF_ENDPOINT', constants.ENDPOINT).rstrip('/')}/api/models/{pretrained}"
    try:
        httpx.head(url, timeout=PROBE_S, follow_redirects=True)
    except httpx.HTTPError as err:
        raise HubUnreachable(f"{key}: {pretrained} is not in the local Hugging Face cache and the hub cannot be reached "
                             f"({type(err).__name__}); " + _fetch_hint(pretrained, key)) from None
    return pretrained
