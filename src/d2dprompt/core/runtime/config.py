"""Typed view of params.yaml, checked once, completely, when it is read: before any stage does work.

Configuration flows one way: params.yaml -> these models -> plain function arguments. Every default
lives here once with its reason, every range beside it, every choice as a Literal. Anything else stops
the stage with one line, `<file>: <key.path>: <what is allowed>` (params_errors.py words it).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from d2dprompt.core.runtime.params_errors import Invalid, ParamsError, describe
from d2dprompt.core.runtime.params_yaml import read_yaml
from d2dprompt.core.vae_factor import TINY, vae_factor

__all__ = [
    "AttentionParams", "Block", "CoreParams", "DistributedParams", "DownloadParams", "EvaluateParams", "FewshotParams", "Invalid", "LatentsParams", "LossParams",
    "ModelParams", "ParamsError", "PromptParams", "TrainParams", "flatten", "read_params", "validate_params",
]



def _once(values: list) -> list:
    seen: set = set()  # one pass: a list of 100,000 entries is checked in milliseconds, not quadratic time
    for value in values:
        if value in seen:
            shown = repr(values) if len(values) <= 20 else f"{len(values)} entries"
            raise ValueError(f"must not list {value!r} twice, got {shown}")
        seen.add(value)
    return values


# datasets the download stage prepares from their publishers' archives: fetched from a pinned URL and sha256, or
# (mpdd, published without a direct link or checksum) read from the archive or folder download.mpdd_path names
Archive = Literal["mvtec", "visa", "btad", "mpdd", "mvtec_ad2"]
MANUAL = {"mpdd": "https://github.com/stepanje/MPDD"}  # archives a user fetches by hand -> the publisher's page with the link
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # becomes a folder and a DVC stage name (folder@<name>)
MethodName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]  # a key of the method registry (d2dprompt.methods.registry)
Once = AfterValidator(_once)  # a repeated entry is a slip: a dataset prepared, trained on or scored twice, a level read twice
MIN_RESAMPLES = 100  # evaluate.bootstrap: the fewest resamples a percentile interval and a p-value stand on
AdamBeta = Annotated[float, Field(ge=0, lt=1)]
Rate = Annotated[float, Field(gt=0, le=1)]


class Block(BaseModel):
    # strict: "3" is not silently 3 (ints still widen to floats); unknown keys are typos, not extensions
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # .inf / .nan pass no bound: refused


class DownloadParams(Block):
    """Datasets are named: an archive source by its own name, a folder by its key in `folders`."""

    RENAMED: typing.ClassVar[dict[str, str]] = {  # keys of earlier versions, and what took their place
        "datasets": "download.archives (mvtec | visa | ...) and download.folders (name: path)",
        "sample_dir": "download.folders.sample",
        "folder_dir": "download.folders (name: path)",
    }

    archives: Annotated[list[Archive], Once] = []  # fetched from the pinned URL below (mpdd: read from mpdd_path), checked, converted
    # name -> an MVTec-layout folder (the repository's or an absolute path); each is a dependency of DVC stage
    # folder@<name>, so editing, adding or removing an image or mask reruns the pipeline from there
    folders: dict[str, str] = {"sample": "data/sample"}
    categories: list[str] = []  # empty = every category of each dataset
    mvtec_url: str = (
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
        "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
    )
    mvtec_sha256: str = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
    visa_url: str = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
    visa_sha256: str = "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"
    btad_url: str = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
    btad_sha256: str = "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a"
    mvtec_ad2_url: str = (
        "https://www.mydrive.ch/shares/121573/7f68fe2c4f7c2ceaa08f463aaeb2f414/"
        "download/466712769-1743422799/mvtec_ad_2.tar.gz"
    )
    mvtec_ad2_sha256: str = "c0ded99ef32bfc8e352d52beb44515e5b292b8598cb963aadfa91ca0763505e4"
    mpdd_path: str = ""  # MPDD as you downloaded it: its .zip / .tar archive or the extracted folder (no direct link exists)
    archive_dir: str = "stages/archives"  # downloaded archives, kept so an interrupted download resumes

    @property
    def datasets(self) -> list[str]:
        """Every dataset the download stages prepare, archives first: what train and evaluate may name."""
        return [*self.archives, *self.folders]

    @model_validator(mode="after")
    def _sources_are_usable(self) -> DownloadParams:
        if not self.datasets:
            raise Invalid("archives", f"no dataset: list an archive ({' | '.join(typing.get_args(Archive))}) or a folder in download.folders")
        for name, path in self.folders.items():
            if not FOLDER_NAME.fullmatch(name):
                raise Invalid("folders", f"{name!r}: a dataset name is letters, digits, '_' and '-' (it names a folder and a stage)")
            if name in typing.get_args(Archive):
                raise Invalid("folders", f"{name!r} is an archive source's name; call the folder something else")
            if not path.strip():
                raise Invalid("folders", f"{name!r}: the folder's path is empty")
        for name in self.archives:
            if name in MANUAL:
                if not getattr(self, f"{name}_path").strip():
                    raise Invalid(f"{name}_path", f"'{name}' is a manual download: fetch it from {MANUAL[name]} "
                                  f"and set download.{name}_path to the archive or its extracted folder")
                continue
            if not getattr(self, f"{name}_url"):
                raise Invalid(f"{name}_url", f"must be set to use the '{name}' source")
            sha256 = getattr(self, f"{name}_sha256")
            if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
                raise Invalid(f"{name}_sha256", f"must be 64 hex digits, got {sha256!r}")
        return self


class ModelParams(Block):
    pretrained: str = Field(TINY, min_length=1)  # "tiny" (embedded, offline), a hub id or a local diffusers folder
    tiny_seed: int = Field(0, ge=0)  # the tiny model's weights are a pure function of this seed
    image_size: int = Field(128, ge=1, le=2048)  # pixels fed to the VAE; 512 for SD 2.1-base / SD 1.5 (divisibility: Params); SDXL's 1024 x 2 at most
    timestep: int = Field(100, ge=0)  # DDPM step of the noised latents the UNet reads; low keeps image detail (< the scheduler's steps: checked at load)
    noise_seed: int = Field(0, ge=0)  # the noise added at `timestep` is fixed per image, so maps are deterministic
    device: str = "auto"  # auto = cuda when available, else cpu; or cpu | cuda | cuda:N (checked below)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"must be one of auto | cpu | cuda | cuda:N, got {value!r}")
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, value: object) -> object:
        if value == "fp16":  # fp16 gradients underflow without loss scaling
            raise ValueError("fp16 is refused: fp16 training needs a gradient scaler, which the pipeline does not have; use bf16 (or auto)")
        return value


class PromptParams(Block):
    n_ctx: int = Field(12, ge=1)  # learnable X tokens in 'X..X object.' / 'X..X damaged object.' (AnomalyCLIP)
    t_n_ctx: int = Field(4, ge=0)  # deep compound prompt length, overwriting tokens 1..t_n_ctx (at most n_ctx)
    depth: int = Field(9, ge=1)  # compound prompts at text-encoder layers 1..depth-1 (AnomalyCLIP); the model caps it
    object_word: str = Field("object", min_length=1)  # class-agnostic: one prompt pair for every category
    abnormal_word: str = Field("damaged", min_length=1)  # AnomalyCLIP's state word for the abnormal prompt
    init_std: float = Field(0.02, gt=0)  # AnomalyCLIP's normal init of the context vectors

    @model_validator(mode="after")
    def _compound_fits(self) -> PromptParams:
        if self.t_n_ctx > self.n_ctx:  # compound tokens overwrite context tokens, so there must be as many
            raise Invalid("t_n_ctx", f"must lie in 0..prompt.n_ctx={self.n_ctx}, got {self.t_n_ctx}")
        return self


class AttentionParams(Block):
    # latent side / 2**level; SD at 512 px: 0..3 = 64, 32, 16, 8; the UNet names the levels it has when it loads
    levels: Annotated[list[Annotated[int, Field(ge=0, le=8)]], Once] = Field([0, 1], min_length=1)
    mode: Literal["cached", "full"] = "cached"  # cached = stored queries, ~text-encoder cost per step; full = UNet every step (exact)
    prompts: Literal["joint", "paired"] = "joint"  # joint = both prompts in one sequence, one pass; paired = one UNet pass per prompt
    recache_every: int = Field(5, ge=0)  # cached mode: recompute the queries with the current prompts every N epochs (0 = never)
    # cached mode: a query cache up to this size is read whole onto the training device (one read; a batch is an index
    # there); a larger one streams its rows, the next batch read in a background thread while a step runs. auto = a
    # quarter of the device's memory (RAM on CPU), so a full-size dataset streams instead of filling the machine;
    # 0 = always stream. The numbers are the same either way.
    cache_resident_gb: Literal["auto"] | float = "auto"
    # cached mode: how the queries are stored. int8 (per-channel scales) takes about half of float16's disk and memory
    # (10.9 instead of 21.9 MiB per training image at SD-2.1 levels 0-2) for a small drift of the maps (BENCHMARKS.md)
    cache_dtype: Literal["float16", "int8"] = "float16"

    @field_validator("cache_resident_gb", mode="before")
    @classmethod
    def _auto_or_size(cls, value):
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
            return value
        raise ValueError(f"must be auto or a size in GB >= 0, got {value!r}")






class LossParams(Block):
    focal: float = Field(1.0, ge=0)  # 2-channel focal loss of (normal, abnormal) maps vs mask
    dice: float = Field(1.0, ge=0)  # dice(abnormal, mask) + dice(normal, 1 - mask)
    image: float = Field(1.0, ge=0)  # class-balanced cross-entropy of the image-level score vs label
    sharpness: float = Field(0.0, ge=0)  # binary entropy of the anomaly map, averaged over all pixels (0 = off)
    coverage: float = Field(0.0, ge=0)  # abnormal mass outside the mask vs inside (0 = off)
    consistency: float = Field(0.0, ge=0)  # agreement of the per-level maps (0 = off)
    focal_gamma: float = Field(2.0, ge=0)  # focal loss focusing parameter (Lin et al.); 0 = cross-entropy
    # training image score = mean of the top 1 % of the anomaly map: robust to one hot pixel, small defects count
    image_top_percent: float = Field(1.0, gt=0, le=100)


class LatentsParams(Block):
    batch_size: int = Field(8, ge=1)  # images per VAE call
    synthetic_per_image: int = Field(2, ge=0)  # K synthetic anomalies made from each normal training image
    seed: int = Field(0, ge=0)  # synthetic anomalies are a pure function of this seed (numpy refuses negative seeds)
    # DRAEM's beta: the image's weight inside the mask, drawn from U(beta_min, beta_max); the texture keeps 1 - beta,
    # so beta_max < 1 leaves at least 1 - beta_max of texture (DRAEM's code draws beta = U(0, 0.8): >= 20 %)
    beta_min: float = Field(0.0, ge=0, lt=1)
    beta_max: float = Field(0.8, ge=0, lt=1)
    min_change: float = Field(8.0, ge=0)  # mean |change| in grey levels inside the mask, else redrawn with the next seed
    perlin_scale_max: int = Field(6, ge=1)  # Perlin period 2**[0, max) per axis (DRAEM)
    perlin_threshold: float = Field(0.5, gt=-1, lt=1)  # Perlin noise (in (-1, 1)) above this becomes the mask (DRAEM)
    texture_dir: str | None = None  # folder of anomaly-source images (e.g. DTD); null = procedural textures
    val_fraction: float = Field(0.2, ge=0, lt=1)  # normal training images held out (with their anomalies) to fit thresholds

    @model_validator(mode="after")
    def _beta_range(self) -> LatentsParams:
        if self.beta_min > self.beta_max:
            raise Invalid("beta_min", f"must be <= latents.beta_max={self.beta_max}, got {self.beta_min}")
        return self


class TrainParams(Block):
    datasets: Annotated[list[str], Once] = Field(["sample"], min_length=1)  # where supervision comes from; each an archive of download.archives or a key of download.folders
    supervision: Literal["synthetic", "annotated"] = "synthetic"  # synthetic = Perlin anomalies on normal images; annotated = real defects + masks
    epochs: int = Field(15, ge=1, json_schema_extra={"hint": "an untrained baseline is train.untrained: true"})  # AnomalyCLIP
    untrained: bool = False  # true = write the initial prompts without optimising: the untrained baseline
    batch_size: int = Field(8, ge=1)  # AnomalyCLIP's batch
    lr: float = Field(0.001, gt=0)  # Adam, as AnomalyCLIP
    betas: list[AdamBeta] = Field([0.5, 0.999], min_length=2, max_length=2)  # AnomalyCLIP's Adam betas
    seed: int = Field(0, ge=0)  # initial prompts and batch order


class EvaluateParams(Block):
    datasets: Annotated[list[str], Once] = ["sample"]  # each an archive or a folder name of download; dvc.yaml runs one evaluate stage per entry
    map_size: int = Field(256, ge=1)  # side at which maps are scored, as anomalib; ground-truth masks are resized to it
    sigma: float = Field(4.0, ge=0)  # Gaussian smoothing in map pixels (AnomalyCLIP / anomalib); 0 = none
    batch_size: int = Field(8, ge=1)  # maps per forward: memory depends on it, results do not
    aupro_fpr_limit: float = Field(0.3, gt=0, le=1)  # the field's AUPRO integrates PRO up to FPR 0.3
    grid_cases: int = Field(2, ge=0)  # per category: this many worst and best anomalous and normal images in the PNG grid
    score: Literal["max", "topk", "fused"] = "fused"  # maps.image_scores; fused ranked first on the sample's validation split (README)
    top_percent: float = Field(5.0, gt=0, le=100)  # % of pixels averaged by the topk score; 5 beat 1 on the validation split (README)
    threshold: Literal["f1", "fixed"] = "f1"  # f1 = F1-optimal on the validation split; fixed = `sensitivity` on the map scale
    sensitivity: float = Field(0.5, ge=0, le=1)  # the fixed threshold (maps lie in [0, 1]), used when threshold = fixed
    opening_kernel: int = Field(3, ge=0)  # square kernel of the morphological opening on binary masks (0/1 = none)
    min_area: int = Field(16, ge=0)  # predicted regions smaller than this many map pixels are dropped
    # AUPIMO (Bertoldo et al., BMVC 2024) integrates each anomalous image's recall over this range of the false-positive
    # rate on normal images, on a log scale: the paper's and anomalib's default
    aupimo_fpr: list[Rate] = Field([1.0e-5, 1.0e-4], min_length=2, max_length=2)
    # resamples of the test images behind every interval (percentile); 0 = no intervals. Below 100 a percentile
    # interval rests on a handful of replicas; 100,000 already takes hours on MVTec AD
    bootstrap: int = Field(1000, ge=0, le=100_000)
    confidence: float = Field(0.95, ge=0.5, lt=1)  # coverage of the intervals; below 0.5 an "interval" may exclude its own estimate
    bootstrap_seed: int = Field(0, ge=0)  # one seed draws the same images for every method, so their replicas pair up

    @field_validator("bootstrap")
    @classmethod
    def _enough_resamples(cls, value: int) -> int:
        if 0 < value < MIN_RESAMPLES:
            raise ValueError(f"must be 0 (no intervals) or at least {MIN_RESAMPLES}: {value} resamples give intervals and p-values "
                             f"that move with the seed, got {value}")
        return value

    @field_validator("aupimo_fpr")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if not value[0] < value[1]:
            raise ValueError(f"must be [lower, upper] with lower < upper, got {value}")
        return value


class FewshotParams(Block):
    """Few normal images per category: the memory of patch features that D2D-Prompt fuses with its prompt maps and
    that patchknn scores with (methods/patch_memory.py). The field's protocol: k in {1, 2, 4}, three draws (seeds)."""

    k: int = Field(0, ge=0)  # normal reference images per category; 0 = no memory for d2dprompt, every image for patchknn
    seed: int = Field(0, ge=0)  # which k images: a draw per (seed, category) from the normal training split
    # weight of the memory map in the fused map, each map normalised on the validation split's normal images first:
    # 0 = the prompt map alone (today's D2D-Prompt), 1 = the memory map alone, between = their weighted mean
    fusion: float = Field(0.5, ge=0, le=1)
    memory_mb: float = Field(256.0, gt=0)  # per category: a memory above it keeps a PatchCore coreset of this size (fp32 rows)
    # batch zero-shot (MuSc, Li et al. ICLR 2024): no reference image; each test image is scored against the other test
    # images of its category, unlabeled, as evaluate scores them together. It reads the whole unlabeled test set
    mutual: bool = False
    interval: float = Field(0.3, gt=0, le=1)  # mutual: the share of smallest per-image distances averaged (MuSc's 0.3)

    @model_validator(mode="after")
    def _memory_or_mutual(self) -> FewshotParams:
        if self.mutual and self.k:
            raise Invalid("mutual", f"scores test images against each other, with no reference image; set fewshot.k: 0 (got {self.k})")
        return self


class DistributedParams(Block):
    """Processes of the queries, train and evaluate stages: dvc.yaml starts `nproc` of them with torchrun (distributed.py)."""

    nproc: int = Field(1, ge=1)  # processes on this machine, one per GPU; 1 = one process, as `python -m d2dprompt.<stage>`
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl on CUDA (GPU to GPU), gloo on CPU (the only one there)
    # a process waiting this long for the others in a collective stops with an error rather than hang (torch's gloo default);
    # it also bounds how long the other processes wait at the end while rank 0 writes the outputs and logs to MLflow
    timeout_s: int = Field(1800, ge=1)


class CoreParams(Block):
    """Every block but the methods' own. The full params (d2dprompt.params.Params) add one block per registered method
    that has one, named like the method, and check `methods` against the registry."""

    methods: Annotated[list[MethodName], Once] = Field(["d2dprompt"], min_length=1)  # each runs through the same data, splits, thresholds and metrics
    download: DownloadParams = DownloadParams()
    model: ModelParams = ModelParams()
    prompt: PromptParams = PromptParams()
    attention: AttentionParams = AttentionParams()
    loss: LossParams = LossParams()
    latents: LatentsParams = LatentsParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    fewshot: FewshotParams = FewshotParams()
    distributed: DistributedParams = DistributedParams()

    @model_validator(mode="before")
    @classmethod
    def _empty_blocks(cls, raw: object) -> object:
        # a block whose keys are all commented out reads as null in YAML: it means the defaults
        return {k: {} if v is None and k != "methods" else v for k, v in raw.items()} if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _consistent(self) -> CoreParams:
        """The checks that span blocks, in the order a reader meets the keys."""
        for key in ("train", "evaluate"):
            for name in getattr(self, key).datasets:
                if name not in self.download.datasets:
                    raise Invalid(f"{key}.datasets", f"{name!r} is not a dataset of download.archives or download.folders; choose from {' | '.join(self.download.datasets)}")
        if self.train.supervision == "annotated":
            for name in self.train.datasets:
                if name in self.evaluate.datasets:
                    raise Invalid("train.supervision", f"annotated trains on the test split of {name}, which evaluate scores; "
                                  "the zero-shot protocol trains on one dataset and evaluates on another")
        _latents_fit_levels(self.model, self.attention.levels)
        if self.distributed.backend == "nccl" and self.model.device == "cpu":
            raise Invalid("distributed.backend", "nccl joins GPUs, and model.device=cpu uses none; use gloo or auto (gloo on CPU)")
        if self.fewshot.mutual and self.distributed.nproc > 1:
            raise Invalid("fewshot.mutual", "scores a category's test images together, in one process; set distributed.nproc: 1")
        if self.evaluate.threshold == "f1" and self.latents.val_fraction == 0:
            raise Invalid("evaluate.threshold", "f1 fits thresholds on the validation split, which latents.val_fraction=0 leaves empty; "
                          "raise latents.val_fraction or set evaluate.threshold: fixed")
        return self


def _latents_fit_levels(model: ModelParams, levels: list[int]) -> None:
    """The VAE's latents must halve evenly down to the coarsest attention level read."""
    try:
        factor = vae_factor(model.pretrained)
    except ValueError as err:
        raise Invalid("model.pretrained", str(err)) from None
    side, step = model.image_size, factor * 2 ** max(levels)
    if side % factor:
        raise Invalid("model.image_size", f"{side} is not a multiple of the VAE factor {factor}; use a multiple of {step}")
    if side % step:
        raise Invalid("model.image_size", f"{side} gives {side // factor}x{side // factor} latents (VAE factor {factor}), "
                      f"not divisible by 2**{max(levels)} for attention.levels={levels}; use a multiple of {step}")



def validate_params(raw: dict | None, model: type[CoreParams]) -> CoreParams:
    """Build `model` from a nested dict; missing keys take their defaults, anything else raises ParamsError."""
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"must be a mapping of blocks ({', '.join(model.model_fields)}), got {type(raw).__name__}")
    try:
        return model.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(describe(err.errors()[0], model)) from None


def read_params(path: str | Path, model: type[CoreParams]) -> CoreParams:
    """Read and check a params file; every problem is one ParamsError line starting with `path`."""
    shown = str(path)
    raw = read_yaml(Path(path), shown)  # its errors already name the file and line
    try:
        return validate_params(raw, model)
    except ParamsError as err:
        raise ParamsError(f"{shown}: {err}") from None


def flatten(params: CoreParams) -> dict[str, object]:
    """'block.key' -> value, as MLflow and `dvc exp show` list params: nested mappings such as download.folders
    flattened ('download.folders.sample'), lists (such as `methods`) and empty mappings as they are."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    walk("", params.model_dump())
    return flat

