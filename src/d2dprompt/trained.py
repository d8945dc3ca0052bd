"""A trained run's folder: `model.safetensors` (the learned tensors only: prompt vectors, network weights; empty when
nothing is learned) + `model.json` (base.config_record: the method's name and the params blocks that rebuild its
model). evaluate, predict and the Python API read a folder here, and reach its method through the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from d2dprompt.core.runtime.config import ParamsError
from d2dprompt.core.training import CONFIG_FILE, WEIGHTS_FILE
from d2dprompt.methods import registry
from d2dprompt.methods.base import Method
from d2dprompt.params import Params, params_from_dict

if TYPE_CHECKING:
    from torch import nn

TODAYS = ("device", "precision")  # model keys that today's params.yaml chooses, not the record
NOT_REBUILT = ("loss", "train", "latents")  # recorded for the checkpoint key, not needed to rebuild the model


def method_of(record: dict) -> str:
    return record.get("method", "d2dprompt")  # folders written before methods existed hold D2D-Prompt


def read_record(folder: str | Path) -> tuple[dict, Params, Method]:
    """model.json, the params it holds (checked as params.yaml is) and its method, naming the file on error."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; run the train stage first")
    record = json.loads((folder / CONFIG_FILE).read_text())
    try:
        method = registry.get(method_of(record))
    except registry.UnknownMethod as err:
        raise ParamsError(f"{folder / CONFIG_FILE}: {err}") from None
    blocks = {b: record[b] for b in method.record_blocks if b not in NOT_REBUILT}
    if "model" in blocks:  # an older record may hold fp16, refused now
        blocks["model"] = {k: v for k, v in blocks["model"].items() if k not in TODAYS}
    try:
        return record, params_from_dict({**blocks, "methods": [method.name]}), method
    except ParamsError as err:
        raise ParamsError(f"{folder / CONFIG_FILE}: {err}") from None


def load_trained(folder: str | Path) -> tuple[nn.Module, dict, Method]:
    """Any method's trained model (in eval mode, on the CPU), its record and its method."""
    from safetensors.torch import load_file

    record, params, method = read_record(folder)
    model = method.build(params, record)
    return method.load_weights(model, load_file(Path(folder) / WEIGHTS_FILE), record), record, method
