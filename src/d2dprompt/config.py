"""Typed view of params.yaml: one dataclass per params block, unknown keys rejected.

Configuration flows one way: params.yaml -> these dataclasses -> plain function
arguments. Every default lives here once, with the reason for it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ParamsError(ValueError):
    """A params file that does not match the schema (unknown key, wrong type)."""


@dataclass
class DownloadParams:
    datasets: list[str] = field(default_factory=lambda: ["sample"])  # sources to prepare: sample | mvtec | visa | folder
    categories: list[str] = field(default_factory=list)  # empty = every category of each dataset
    sample_dir: str = "data/sample"  # the bundled sample, materialised by data.dvc
    folder_dir: str | None = None  # any MVTec-layout folder of your own (source `folder`)
    mvtec_url: str = (
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
        "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
    )
    mvtec_sha256: str = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
    visa_url: str = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
    visa_sha256: str = "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"
    archive_dir: str = "stages/archives"  # downloaded archives, kept so an interrupted download resumes


@dataclass
class ModelParams:
    pretrained: str = "tiny"  # "tiny" (embedded, offline), a hub id or a local diffusers folder
    tiny_seed: int = 0  # the tiny model's weights are a pure function of this seed
    image_size: int = 128  # pixels fed to the VAE; 512 for SD 2.1-base / SD 1.5
    timestep: int = 100  # DDPM step of the noised latents the UNet reads; low keeps image detail
    noise_seed: int = 0  # the noise added at `timestep` is fixed per image, so maps are deterministic
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16


@dataclass
class PromptParams:
    n_ctx: int = 12  # learnable X tokens in 'X..X object.' / 'X..X damaged object.' (AnomalyCLIP)
    t_n_ctx: int = 4  # deep compound prompt length, overwriting tokens 1..t_n_ctx
    depth: int = 9  # compound prompts at text-encoder layers 1..depth-1 (AnomalyCLIP)
    object_word: str = "object"  # class-agnostic: one prompt pair for every category
    abnormal_word: str = "damaged"
    init_std: float = 0.02  # AnomalyCLIP's normal init of the context vectors


@dataclass
class AttentionParams:
    levels: list[int] = field(default_factory=lambda: [0, 1])  # latent side / 2**level; SD at 512 px: 0..3 = 64,32,16,8
    mode: str = "cached"  # cached = stored queries, ~text-encoder cost per step; full = UNet every step (exact)
    prompts: str = "joint"  # joint = both prompts in one sequence, one pass; paired = one UNet pass per prompt
    recache_every: int = 5  # cached mode: recompute the queries with the current prompts every N epochs (0 = never)


@dataclass
class LossParams:
    focal: float = 1.0  # 2-channel focal loss of (normal, abnormal) maps vs mask
    dice: float = 1.0  # dice(abnormal, mask) + dice(normal, 1 - mask)
    image: float = 1.0  # cross-entropy of the image-level logit vs label
    sharpness: float = 0.0  # entropy of the abnormal map inside defects (0 = off)
    coverage: float = 0.0  # abnormal mass outside the mask vs inside (0 = off)
    consistency: float = 0.0  # agreement of the per-level maps (0 = off)
    focal_gamma: float = 2.0  # focal loss focusing parameter (Lin et al.)


@dataclass
class LatentsParams:
    batch_size: int = 8  # images per VAE call
    synthetic_per_image: int = 2  # K synthetic anomalies made from each normal training image
    seed: int = 0  # synthetic anomalies are a pure function of this seed
    beta_min: float = 0.0  # DRAEM's beta ~ U(0, 0.8) weighs the image inside the mask; the texture keeps 1 - beta
    beta_max: float = 0.8  # so at least 20 % texture (DRAEM's code)
    min_change: float = 8.0  # mean grey-level change inside the mask a synthetic defect must reach, else redrawn
    perlin_scale_max: int = 6  # Perlin period 2**[0, max) per axis (DRAEM)
    perlin_threshold: float = 0.5  # Perlin noise above this becomes the anomaly mask (DRAEM)
    texture_dir: str | None = None  # folder of anomaly-source images (e.g. DTD); null = procedural textures
    val_fraction: float = 0.2  # normal training images held out (with their synthetic anomalies) to fit thresholds


@dataclass
class TrainParams:
    datasets: list[str] = field(default_factory=lambda: ["sample"])  # where supervision comes from
    supervision: str = "synthetic"  # synthetic = Perlin anomalies on normal images; annotated = real defects + masks
    epochs: int = 15  # AnomalyCLIP trains 15 epochs
    batch_size: int = 8  # AnomalyCLIP's batch
    lr: float = 0.001  # Adam, as AnomalyCLIP
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # AnomalyCLIP's Adam betas
    seed: int = 0


@dataclass
class EvaluateParams:
    datasets: list[str] = field(default_factory=lambda: ["sample"])
    map_size: int = 256  # side at which maps are scored, as anomalib; ground-truth masks are resized to it
    sigma: float = 4.0  # Gaussian smoothing in map pixels (AnomalyCLIP / anomalib)
    batch_size: int = 8
    aupro_fpr_limit: float = 0.3  # the field's AUPRO integrates PRO up to FPR 0.3
    grid_cases: int = 2  # per category: this many worst and best anomalous and normal images in the PNG grid
    score: str = "topk"  # max | topk | fused (maps.image_scores); topk won on the sample's validation split (README)
    top_percent: float = 5.0  # % of pixels averaged by the topk score; 5 beat 1 on the validation split
    threshold: str = "f1"  # f1 = F1-optimal on the validation split; fixed = `sensitivity` on the map scale
    sensitivity: float = 0.5  # the fixed threshold, used when threshold = fixed
    opening_kernel: int = 3  # square kernel of the morphological opening on binary masks (0/1 = none)
    min_area: int = 16  # predicted regions smaller than this many map pixels are dropped


@dataclass
class Params:
    download: DownloadParams = field(default_factory=DownloadParams)
    model: ModelParams = field(default_factory=ModelParams)
    prompt: PromptParams = field(default_factory=PromptParams)
    attention: AttentionParams = field(default_factory=AttentionParams)
    loss: LossParams = field(default_factory=LossParams)
    latents: LatentsParams = field(default_factory=LatentsParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


def _coerce(value, annotation, key: str):
    """Check `value` against a dataclass field type; ints widen to floats, nothing else is guessed."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ParamsError(f"params key '{key}' must be a mapping")
        return _build(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ParamsError(f"params key '{key}' must be a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and isinstance(value, bool):
        return value
    if isinstance(value, annotation) and not (isinstance(value, bool) and annotation is not bool):
        return value
    raise ParamsError(f"params key '{key}' must be {annotation.__name__}, got {value!r}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ParamsError(f"unknown params key '{where}'")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def params_from_dict(raw: dict | None) -> Params:
    """Build Params from a nested dict; missing keys take their defaults, unknown keys raise."""
    return _build(Params, raw or {})


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    with path.open() as fh:
        raw = yaml.safe_load(fh)
    try:
        return params_from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def flatten(params: Params) -> dict[str, object]:
    """'block.key' -> value, as MLflow and `dvc exp show` list params."""
    out: dict[str, object] = {}
    for block, values in dataclasses.asdict(params).items():
        for key, value in values.items():
            out[f"{block}.{key}"] = value
    return out
