"""Training checkpoints as safetensors + JSON: resumable, never executable, never stale.

A checkpoint is a folder holding `state.safetensors` (the learned tensors: prompt vectors or network weights and
buffers, the optimiser's moment tensors, and in D2D-Prompt's cached mode the prompts the query cache was last
refreshed with) and `state.json` (the run's fingerprint, per-epoch history, the optimiser's hyper-parameters and
a method's own JSON progress, `meta`). Loading reads tensors and JSON only, so a
file placed at the checkpoint path can never run code (a pickle there is refused, not unpickled).

Design choices:
- The fingerprint covers params, the training data, the package's own source code and the versions
  of the libraries that compute the maps: a rerun after any code change trains from scratch.
- The train stage deletes its checkpoint once the outputs are written: only an interrupted run
  leaves one behind, so a finished run can never be "resumed" into stale outputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from d2dprompt.core.runtime.outputs import atomic_dir

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
LIBRARIES = ("torch", "diffusers", "transformers")  # their numerics shape the maps the prompts train on
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the d2dprompt package: core/runtime/ is two levels down


class CheckpointError(ValueError):
    """A file at the checkpoint path that is not a checkpoint this code wrote."""


def code_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over every file of the package (sources and bundled assets), by relative path."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for name in LIBRARIES:
        digest.update(f"{name}=={metadata.version(name)}\0".encode())
    return digest.hexdigest()


def fingerprint(record: dict, data_files: list[Path], code: str) -> str:
    """Params record + training data files + code digest: a checkpoint resumes only a run with all three unchanged."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for path in data_files:
        with path.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    digest.update(code.encode())
    return digest.hexdigest()[:16]


@dataclass
class TrainState:
    fingerprint: str
    weights: dict[str, torch.Tensor]  # what is learned (a module's state_dict: parameters and buffers)
    optimizer: dict
    history: list[dict[str, float]] = field(default_factory=list)
    refresh_prompts: dict[str, torch.Tensor] | None = None  # cached mode: prompts of the last query refresh
    meta: dict = field(default_factory=dict)  # a method's own progress as JSON (DRAEM: the category being trained)


def save_state(state: TrainState, folder: Path) -> None:
    tensors = {f"weights/{k}": v.detach().cpu().contiguous() for k, v in state.weights.items()}
    for index, slots in state.optimizer["state"].items():
        for key, value in slots.items():
            tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
    for k, v in (state.refresh_prompts or {}).items():
        tensors[f"refresh/{k}"] = v.detach().cpu().contiguous()
    meta = {
        "fingerprint": state.fingerprint,
        "history": state.history,
        "param_groups": state.optimizer["param_groups"],
        "refresh": state.refresh_prompts is not None,
        "meta": state.meta,
    }
    with atomic_dir(folder) as tmp:
        save_file(tensors, tmp / STATE_TENSORS)
        (tmp / STATE_JSON).write_text(json.dumps(meta))


def load_state(folder: Path) -> TrainState | None:
    """The checkpoint in `folder`, None when there is none; CheckpointError for anything else found there."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected {STATE_TENSORS} + {STATE_JSON}); remove it to train from scratch")
    try:
        tensors = load_file(folder / STATE_TENSORS)
        meta = json.loads((folder / STATE_JSON).read_text())
        fingerprint_, history, groups, has_refresh, own = meta["fingerprint"], meta["history"], meta["param_groups"], meta["refresh"], meta["meta"]
    except (OSError, SafetensorError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: not a readable checkpoint ({type(err).__name__}); remove it to train from scratch") from None
    optimizer: dict = {"state": {}, "param_groups": groups}
    weights, refresh = {}, {}
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "weights":
            weights[rest] = value
        elif kind == "refresh":
            refresh[rest] = value
        else:
            index, _, key = rest.partition("/")
            optimizer["state"].setdefault(int(index), {})[key] = value
    return TrainState(fingerprint_, weights, optimizer, history, refresh if has_refresh else None, own)
