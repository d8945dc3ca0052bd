"""A trained run's folder: `model.safetensors` (the learned parameters only: prompt vectors, network weights;
empty for d2d) + `model.json`.

model.json names the method and holds the params blocks that rebuild its model, so evaluate and
predict need nothing else: d2dprompt and d2d rebuild a D2DSegmenter on the frozen SD model, anomalyclip
an AnomalyCLIP on the frozen CLIP, draem one DRAEM per category, decodiff a DeCo-Diff UNet beside the frozen VAE.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from d2dprompt.config import Params, ParamsError, params_from_dict
from d2dprompt.models import FrozenSD, load_frozen
from d2dprompt.outputs import atomic_file, write_json
from d2dprompt.methods.d2dprompt import D2DSegmenter, build_segmenter

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "model.json"
# the params blocks each method's model is a function of (and a checkpoint is keyed on)
RECORD_BLOCKS = {
    "d2dprompt": ("model", "prompt", "attention", "loss", "train"),
    "d2d": ("model", "attention", "d2d"),
    "anomalyclip": ("anomalyclip", "prompt", "loss", "train"),
    "draem": ("draem", "latents", "train"),
    "decodiff": ("model", "decodiff", "latents", "train"),
}
TODAYS = ("device", "precision")  # model keys that today's params.yaml chooses, not the record


def config_record(cfg: Params, method: str = "d2dprompt") -> dict:
    """What a trained folder depends on: enough to rebuild the model, and to refuse a stale checkpoint."""
    return {"method": method, **{block: getattr(cfg, block).model_dump() for block in RECORD_BLOCKS[method]}}


def method_of(record: dict) -> str:
    return record.get("method", "d2dprompt")  # folders written before methods existed hold D2D-Prompt


def save_prompts(model: nn.Module, record: dict, folder: Path) -> None:
    with atomic_file(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.prompts.state_dict().items()}, tmp)
    write_json(folder / CONFIG_FILE, record)


def read_record(folder: str | Path) -> tuple[dict, Params]:
    """model.json and the params it holds (checked as params.yaml is), naming the file on error."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; run the train stage first")
    record = json.loads((folder / CONFIG_FILE).read_text())
    method = method_of(record)
    if method not in RECORD_BLOCKS:
        raise ParamsError(f"{folder / CONFIG_FILE}: unknown method {method!r}")
    blocks = {b: record[b] for b in RECORD_BLOCKS[method] if b not in ("loss", "train", "latents")}
    if "model" in blocks:  # an older record may hold fp16, refused now
        blocks["model"] = {k: v for k, v in blocks["model"].items() if k not in TODAYS}
    try:
        return record, params_from_dict(blocks)
    except ParamsError as err:
        raise ParamsError(f"{folder / CONFIG_FILE}: {err}") from None


def build_d2d_segmenter(sd: FrozenSD, cfg: Params, early_exit: bool = True) -> D2DSegmenter:
    """D2D: the fixed sentences of `cfg.d2d` in place of learned prompts, the same capture and maps."""
    from d2dprompt.methods.d2d import FixedPrompts

    d = cfg.d2d
    prompts = FixedPrompts(sd.tokenizer, d.normal_prompt, d.abnormal_prompt, d.normal_words, d.abnormal_words, cfg.attention.prompts == "joint")
    return D2DSegmenter(sd, prompts, cfg.attention.levels, cfg.model.timestep, early_exit)


def build_anomalyclip(cfg: Params):
    from d2dprompt.methods.anomalyclip import AnomalyCLIP, load_clip

    a, p = cfg.anomalyclip, cfg.prompt
    clip, tokenizer = load_clip(a.pretrained, a.tiny_seed, a.image_size)
    return AnomalyCLIP(clip, tokenizer, p.n_ctx, p.t_n_ctx, p.depth, p.object_word, p.abnormal_word, p.init_std, a.dpam_layers, a.feature_layers)


def load_segmenter(folder: str | Path, sd: FrozenSD | None = None, early_exit: bool = True) -> tuple[D2DSegmenter, dict]:
    """Rebuild a d2dprompt or d2d segmenter from its folder (loads SD when not given)."""
    record, cfg = read_record(folder)
    method = method_of(record)
    if method == "anomalyclip":
        raise ValueError(f"{Path(folder) / CONFIG_FILE}: an anomalyclip run; it has no SD segmenter")
    if sd is None:
        sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed)
    if method == "d2d":
        return build_d2d_segmenter(sd, cfg, early_exit), record
    segmenter = build_segmenter(sd, cfg.prompt, cfg.attention, cfg.model, early_exit)
    segmenter.prompts.load_state_dict(load_file(Path(folder) / WEIGHTS_FILE))
    return segmenter, record


def load_draem(folder: Path, record: dict, cfg: Params) -> nn.ModuleDict:
    """One DRAEM per '<dataset>/<category>' of the record, in eval mode (its BatchNorm uses running statistics)."""
    from d2dprompt.methods.draem import Draem

    weights = load_file(folder / WEIGHTS_FILE)
    models = nn.ModuleDict()
    for index, name in enumerate(record["categories"]):
        model = Draem(cfg.draem.recon_width, cfg.draem.disc_width)
        model.load_state_dict({k.removeprefix(f"{name}/"): v for k, v in weights.items() if k.startswith(f"{name}/")})
        models[str(index)] = model.eval()  # ModuleDict keys may not hold '/' or '.'
    return models


def build_decodiff(record: dict, cfg: Params):
    """An untrained DeCo-Diff for the latents and categories a trained folder's record names."""
    from d2dprompt.methods.decodiff import DecoDiff, build_unet

    d = cfg.decodiff
    channels, side = record["latent_shape"][0], record["latent_shape"][1]
    unet = build_unet(channels, side, d.channels, d.layers_per_block, len(record["categories"]))
    return DecoDiff(unet, d.timesteps, d.beta_start, d.beta_end, d.mask_ratio, d.shuffle_ratio)


def load_decodiff(folder: Path, record: dict, cfg: Params):
    """The trained DeCo-Diff with the frozen VAE its latents came from as `.vae` (moved along with it), in eval mode."""
    from d2dprompt.models import load_vae

    model = build_decodiff(record, cfg)
    model.unet.load_state_dict(load_file(folder / WEIGHTS_FILE))
    model.vae = load_vae(cfg.model.pretrained, cfg.model.tiny_seed)
    return model.eval()


def load_trained(folder: str | Path, early_exit: bool = True) -> tuple[nn.Module, dict]:
    """Any method's trained model: a D2DSegmenter (d2dprompt, d2d), an AnomalyCLIP, DRAEMs per category, a DeCo-Diff."""
    record, cfg = read_record(folder)
    method = method_of(record)
    if method == "draem":
        return load_draem(Path(folder), record, cfg), record
    if method == "decodiff":
        return load_decodiff(Path(folder), record, cfg), record
    if method != "anomalyclip":
        return load_segmenter(folder, early_exit=early_exit)
    model = build_anomalyclip(cfg)
    model.prompts.load_state_dict(load_file(Path(folder) / WEIGHTS_FILE))
    return model, record


def move_to(model: nn.Module, record: dict, device) -> nn.Module:
    """`model.to(device)` plus the frozen backbone it keeps outside its state (SD for d2dprompt / d2d, CLIP for anomalyclip)."""
    model.to(device)
    frozen = {"anomalyclip": "clip", "d2dprompt": "sd", "d2d": "sd"}.get(method_of(record))
    if frozen:
        getattr(model, frozen).to(device)
    return model
