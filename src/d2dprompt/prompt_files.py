"""Trained prompt files: `prompts.safetensors` (prompt parameters only) + `prompts.json` (the config behind them)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from d2dprompt.config import Params, ParamsError, params_from_dict
from d2dprompt.models import FrozenSD, load_frozen
from d2dprompt.outputs import atomic_file, write_json
from d2dprompt.segmenter import D2DSegmenter, build_segmenter

PROMPTS_FILE, CONFIG_FILE = "prompts.safetensors", "prompts.json"


def config_record(cfg: Params) -> dict:
    """What a prompt file depends on: enough to rebuild the segmenter, and to refuse a stale checkpoint."""
    return {
        "model": cfg.model.model_dump(),
        "prompt": cfg.prompt.model_dump(),
        "attention": cfg.attention.model_dump(),
        "loss": cfg.loss.model_dump(),
        "train": cfg.train.model_dump(),
    }


def save_prompts(segmenter: D2DSegmenter, record: dict, folder: Path) -> None:
    with atomic_file(folder / PROMPTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in segmenter.prompts.state_dict().items()}, tmp)
    write_json(folder / CONFIG_FILE, record)


def load_segmenter(folder: str | Path, sd: FrozenSD | None = None, early_exit: bool = True) -> tuple[D2DSegmenter, dict]:
    """Rebuild the trained segmenter from `prompts.json` + `prompts.safetensors` (loads SD when not given)."""
    folder = Path(folder)
    for name in (CONFIG_FILE, PROMPTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; run the train stage first")
    record = json.loads((folder / CONFIG_FILE).read_text())
    # device and precision are today's params.yaml's to choose (an older record may hold fp16, refused now)
    model = {k: v for k, v in record["model"].items() if k not in ("device", "precision")}
    try:
        cfg = params_from_dict({"model": model, "prompt": record["prompt"], "attention": record["attention"]})
    except ParamsError as err:
        raise ParamsError(f"{folder / CONFIG_FILE}: {err}") from None
    if sd is None:
        sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed)
    segmenter = build_segmenter(sd, cfg.prompt, cfg.attention, cfg.model, early_exit)
    segmenter.prompts.load_state_dict(load_file(folder / PROMPTS_FILE))
    return segmenter, record
