"""What a method is: the one protocol every folder under methods/ implements (registry.py lists them).

A method is a subclass of `Method`, one instance per name. Its class attributes say what the stages need to know
before anything loads (its params block, what it reads, on how many processes it trains, which datasets it learns
from, whose image score it reports); its functions train it, rebuild it from a trained folder, place it on a device
and score a batch. The stages (train, evaluate, predict), the Python API, the web app and the MLflow model call
nothing else of a method, so a new method is one folder plus one registry line (README "Add a method").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import numpy as np
    import torch
    from torch import nn

    from d2dprompt.core.runtime.config import Block, CoreParams, EvaluateParams, LossParams, ModelParams

# (inputs, '<dataset>/<category>' per input or None when unknown) -> (maps (B, map_size, map_size), image scores (B,)),
# float32 on the CPU. Inputs are what `Method.reads` names: stored latents (B, C, h, w) as the latents stage keeps them,
# or images (B, 3, S, S) in [0, 1] at `Method.input_size`.
BatchScorer = Callable[["torch.Tensor", list], tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class Scoring:
    """How maps and image scores are finished: the evaluate block's map scale and score, today's precision, and the
    loss block's image_top_percent (the `fused` score's image term is the training image term)."""

    map_size: int
    sigma: float
    score: str
    top_percent: float
    image_top_percent: float
    precision: str
    batch_size: int

    @classmethod
    def of(cls, evaluate: EvaluateParams, loss: LossParams, model: ModelParams) -> Scoring:
        return cls(evaluate.map_size, evaluate.sigma, evaluate.score, evaluate.top_percent, loss.image_top_percent,
                   model.precision, evaluate.batch_size)


@dataclass(frozen=True)
class TrainJob:
    """Where a train entry reads and writes: the stage's folders, its MLflow run and the code digest checkpoints key on."""

    latents: Path  # the latents stage's output: index.csv + latents per dataset
    downloads: Path  # the download stage's output: the images, for methods that read pixels
    queries: Path  # the queries stage's output (D2D-Prompt's cached mode)
    out: Path  # model.safetensors, model.json, history.csv go here
    checkpoint: Path  # per-epoch state, deleted once the outputs are written
    log: Any = None  # a tracking.RunLogger (or UntrackedRun); None in tests
    code: str | None = None  # the code digest a checkpoint is keyed on; None = this package's (checkpoints.code_digest)
    echo: Callable[[str], None] = print


class Method:
    """One method. Subclasses set the class attributes and implement train, build, load_weights and scorer."""

    name: ClassVar[str]
    params: ClassVar[type[Block] | None] = None  # its own params.yaml block, keyed by `name`; None = it has none
    record_blocks: ClassVar[tuple[str, ...]] = ()  # params blocks model.json keeps: the trained model is a function of them
    reads: ClassVar[Literal["latents", "pixels"]]  # stored VAE latents (the latents stage's) or the images themselves
    multi_process: ClassVar[bool] = False  # trains data-parallel under torchrun (distributed.nproc > 1)
    # "train": learns from train.datasets under train.supervision (prompt methods, zero-shot protocol);
    # "evaluate": from the normal training images of evaluate.datasets, the data it is tested on (trained from scratch)
    learns_from: ClassVar[Literal["train", "evaluate"]] = "train"
    own_image_score: ClassVar[bool] = False  # True = the image score its authors' code computes, not evaluate.score
    per_category: ClassVar[bool] = False  # one model per category: evaluate scores one category's rows per batch

    def check(self, params: CoreParams) -> None:
        """Checks across blocks that apply when `methods` lists this method; raise config.Invalid(key, message)."""

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        """Train (resuming from job.checkpoint when it matches) and write job.out; returns the per-epoch history."""
        raise NotImplementedError

    def build(self, params: CoreParams, record: dict) -> nn.Module:
        """The untrained model a trained folder's record describes, frozen backbones included."""
        raise NotImplementedError

    def load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor], record: dict) -> nn.Module:
        """Put model.safetensors' tensors into `build`'s model; returns it in eval mode."""
        raise NotImplementedError

    def place(self, model: nn.Module, device: torch.device | str) -> nn.Module:
        """Move everything the model computes with to `device` (see `place`)."""
        return place(model, device)

    def inputs(self, record: dict) -> Literal["latents", "pixels"]:
        """What a trained model's scorer reads: `reads`, unless its record chooses (patchknn's features)."""
        return self.reads

    def off_unit_scale(self, record: dict) -> str | None:
        """None when a trained model's maps lie in [0, 1], where a fixed threshold (evaluate.sensitivity) reads them;
        otherwise what they are, for the one-line refusal of a fixed threshold."""
        return None

    def scores_together(self, record: dict) -> bool:
        """True = its scorer needs a category's images in one call (batch zero-shot: each scored against the others);
        evaluate then gives it every image of a category of a split at once, and predict refuses it."""
        return False

    def input_size(self, record: dict) -> int:
        """The side, in pixels, the trained model reads images at."""
        return record["model"]["image_size"]

    def encode(self, model: nn.Module, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """uint8 HxWx3 images at `input_size` -> what `scorer` reads: [0, 1] pixels here, latents for latent methods."""
        from d2dprompt.core.data.row_images import to_unit

        return to_unit(images)

    def scorer(self, model: nn.Module, record: dict, scoring: Scoring, device: torch.device) -> BatchScorer:
        """A function scoring one batch of inputs (see BatchScorer)."""
        raise NotImplementedError

    def graph_inputs(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """`encode` in torch alone, for an exported graph: (B, 3, S, S) float32 pixels in [0, 1] -> what `scorer` reads.
        A method reading latents says how it encodes them (graph.latents_of with its VAE)."""
        if self.reads == "latents":
            from d2dprompt.methods.graph import NotExportable

            raise NotExportable(f"{self.name}: reads latents, and defines no graph_inputs encoding pixels to them in torch")
        return pixels

    def export_graph(self, model: nn.Module, record: dict, scoring: Scoring, category: str | None) -> nn.Module:
        """The module export.py traces to ONNX: pixels (B, 3, S, S) in [0, 1] at `input_size` -> (maps (B, map_size,
        map_size), image scores (B,)), as `encode` + `scorer` compute them for `category`. Raise graph.NotExportable
        (one line: why) when a trained run has no such graph."""
        from d2dprompt.methods.graph import NotExportable, ScorerGraph

        if self.scores_together(record):
            raise NotExportable(f"{self.name}: this run scores a category's images against each other (fewshot.mutual: true): "
                                "a graph scores images one by one; train with fewshot.k > 0 for a memory instead")
        return ScorerGraph(self, model, record, scoring, category)

    def export_tolerance(self, record: dict) -> float:
        """The largest |map| and |score difference| from PyTorch export.py accepts for this run's graphs (a decision
        may then differ only for an image scored within it of the threshold). 1e-4, the bound of maps in [0, 1] computed in fp32: a method that reads the stored fp16
        latents as values (patchknn's latent features, DeCo-Diff's repainting) states how far it moves when a latent
        rounds to the neighbouring fp16 value, which two fp32 VAE encoders (PyTorch's, onnxruntime's) differing by
        1e-5 make happen for about 1 % of latents."""
        return 1e-4

    def benchmark(self, scale: str, device: torch.device, precision: str, steps: int) -> dict | None:
        """Timings of one training step and of inference on random inputs, at the paper's size (`scale` "paper") or
        the embedded default's ("tiny"): train_step_ms, infer_ms_per_image, batch, image_size, parameters_M, and the
        first and last losses of the timed steps. None = no benchmark (bench/methods.py lists the methods that have one)."""
        return None

    def image_score_name(self, score: str) -> str:
        """What thresholds.json records as the image score: evaluate.score, or the method's own name."""
        return self.name if self.own_image_score else score


def reached_modules(model: Any) -> list[tuple[str, Any]]:
    """(dotted path, module) of every module the model computes with: its submodules, and the frozen backbones it
    keeps as plain attributes (out of state_dict, so a trained file holds only what was learned), found in the
    attributes of every module reached and inside dataclasses (models.FrozenSD). One walk for `place` and `tensors_of`."""
    from torch import nn

    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(value: Any, path: str) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, nn.Module):
            for name, module in value.named_modules(prefix=path):
                found.append((name, module))
                for key, attribute in vars(module).items():
                    if isinstance(attribute, nn.Module) or dataclasses.is_dataclass(attribute) and not isinstance(attribute, type):
                        visit(attribute, f"{name}.{key}")
        elif dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                visit(getattr(value, field.name), f"{path}.{field.name}")

    visit(model, "model")
    return found


def place(model: Any, device: Any) -> Any:
    """`model.to(device)` for everything the model computes with (`reached_modules`): `Module.to` alone misses the
    frozen backbones kept as plain attributes."""
    moved: set[int] = set()
    for _, module in reached_modules(model):  # parents come before their submodules, which move with them
        if id(module) not in moved:
            module.to(device)
            moved |= {id(m) for m in module.modules()}
    return model


def tensors_of(model: Any) -> dict[str, Any]:
    """Every tensor of the modules `place` moves, by a dotted path: parameters, buffers and plain tensor attributes
    (which `Module.to` would not move: the placement test would show them left behind)."""
    import torch

    found: dict[str, torch.Tensor] = {}
    for name, module in reached_modules(model):
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            found[f"{name}.{key}"] = tensor
        for key, attribute in vars(module).items():
            if isinstance(attribute, torch.Tensor) and not key.startswith("_"):
                found[f"{name}.{key}"] = attribute
    return found


def config_record(method: Method, params: CoreParams, **extra: Any) -> dict:
    """model.json: the method's name and the params blocks its model is a function of (enough to rebuild it, and to
    refuse a stale checkpoint), plus what training found out (`extra`: categories, latent shape, ...)."""
    return {"method": method.name, **{block: getattr(params, block).model_dump() for block in method.record_blocks}, **extra}


def category_index(record: dict, category: str | None, label: str) -> int:
    """Which of a run's categories ('<dataset>/<category>', model.json's `categories`) `category` is: a DRAEM's model, a
    DeCo-Diff's class label. None is the one category of a run that trained one."""
    names = record["categories"]
    if category is None and len(names) == 1:
        return 0
    if category is None:
        raise ValueError(f"{label} knows its categories: choose --category from {' | '.join(names)}")
    if category not in names:
        raise ValueError(f"{category}: no {label} model was trained for this category ({' | '.join(names)}); rerun train@{label}")
    return names.index(category)
