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
ADDED_LATER = ("fewshot",)  # blocks a record written before they existed lacks: their defaults (k 0, no memory) held


def method_of(record: dict) -> str:
    return record.get("method", "d2dprompt")  # folders written before methods existed hold D2D-Prompt


# what a record holds beside its params blocks: (key, type, in words)
RECORD_EXTRAS = (("categories", list, "a list of '<dataset>/<category>' names"), ("memory", dict, "a mapping of categories"),
                 ("memory_shapes", dict, "a mapping of tensor names to shapes"))


def read_record(folder: str | Path) -> tuple[dict, Params, Method]:
    """model.json, the params it holds (checked as params.yaml is) and its method, naming the file on error."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; run the train stage first")
    path = folder / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ParamsError(f"{path}: not valid JSON ({err}); rerun the train stage") from None
    if not isinstance(record, dict):
        raise ParamsError(f"{path}: must be a JSON object of params blocks (train writes one), got {type(record).__name__}")
    try:
        method = registry.get(method_of(record))
    except (registry.UnknownMethod, TypeError) as err:
        raise ParamsError(f"{path}: {err}") from None
    for block in method.record_blocks:
        if block in ADDED_LATER and block not in record:
            record[block] = {}
        if not isinstance(record.get(block), dict):
            raise ParamsError(f"{path}: {block}: must be a mapping of keys (the params block {method.name} was trained with), "
                              f"got {json.dumps(record.get(block))}")
    for key, kind, words in RECORD_EXTRAS:
        value = record.get(key, kind())
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise ParamsError(f"{path}: {key}: must be {words} (train writes it), got {json.dumps(value)[:80]}; rerun the train stage")
    blocks = {b: record[b] for b in method.record_blocks if b not in NOT_REBUILT}
    if "model" in blocks:  # an older record may hold fp16, refused now
        blocks["model"] = {k: v for k, v in blocks["model"].items() if k not in TODAYS}
    try:
        params = params_from_dict({**blocks, "methods": [method.name]})
    except ParamsError as err:
        raise ParamsError(f"{folder / CONFIG_FILE}: {err}") from None
    # every key present (a missing one at its validated default), every recorded value kept as written: the code
    # that rebuilds the model reads them
    record = {**record, **{b: {**getattr(params, b).model_dump(), **record[b]} for b in blocks if hasattr(params, b)}}
    return record, params, method


def load_trained(folder: str | Path) -> tuple[nn.Module, dict, Method]:
    """Any method's trained model (in eval mode, on the CPU), its record and its method."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    record, params, method = read_record(folder)
    path = Path(folder) / WEIGHTS_FILE
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a safetensors file ({err}); rerun the train stage") from None
    model = method.build(params, record)
    try:
        return method.load_weights(model, weights, record), record, method
    except (RuntimeError, KeyError) as err:  # missing, unexpected or misshapen tensors
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: does not hold the weights of the {method.name} model model.json describes ({first}); rerun the train stage") from None
