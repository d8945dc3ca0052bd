"""core/hub.py: a hub checkpoint that is neither cached nor reachable fails in seconds with one line that says how
to fetch it once; a cached one needs no network; a local folder is used as it is."""

from __future__ import annotations

import time

import pytest

from d2dprompt.core import hub

REPO = "stabilityai/stable-diffusion-2-1-base"


def test_an_unreachable_hub_fails_within_seconds_in_one_line(tmp_path, monkeypatch):
    """Before: 55 "Retrying in 8s" lines and ~330 lines of traceback after 4 min 38 s."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        hub.resolve(REPO)
    message = str(info.value)
    assert time.monotonic() - started < hub.PROBE_S + 2 and "\n" not in message
    assert message.startswith(f"model.pretrained: {REPO} is not in the local Hugging Face cache and the hub cannot be reached")
    assert f"hf download {REPO} --local-dir <folder>" in message


def test_offline_mode_fails_at_once_and_a_cached_snapshot_needs_no_network(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"^anomalyclip\.pretrained: .* HF_HUB_OFFLINE is set"):
        hub.resolve("openai/clip-vit-large-patch14-336", "anomalyclip.pretrained")
    # the cache's layout: models--<org>--<name>/refs/main names the snapshot folder that holds the files
    repo = cache / "models--stabilityai--stable-diffusion-2-1-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("abc123")
    (repo / "snapshots/abc123/unet").mkdir(parents=True)
    assert hub.resolve(REPO) == str(repo / "snapshots/abc123")


def test_a_local_folder_is_used_as_given(tmp_path):
    assert hub.resolve(str(tmp_path)) == str(tmp_path)
