"""patchknn: the floor every learned method has to beat. Patch nearest neighbours, no learning: a category's memory
holds the patch features of `fewshot.k` normal training images (all of them at k 0, a PatchCore coreset above
`fewshot.memory_mb`), and a test patch scores its distance to the nearest one; with `fewshot.mutual` a category's
test images are each other's memory (MuSc). model.py (features, distances),
train.py (train@patchknn: the memories). Features (`patchknn.features`): the latents stage's VAE latents (each cell
with its neighbourhood), or raw pixel patches at model.image_size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from d2dprompt.core.runtime.config import Block, Invalid
from d2dprompt.methods.base import Method, Scoring, TrainJob, category_index

if TYPE_CHECKING:
    import numpy as np
    import torch

    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.patchknn.model import PatchKNN


class PatchKNNParams(Block):
    """What a patch is; how many normal images and how large a memory are the fewshot block's."""

    features: Literal["latents", "pixels"] = "latents"  # the VAE latents D2D-Prompt reads, or the raw pixels
    neighbourhood: int = Field(3, ge=1)  # latents: cells concatenated around each (PatchCore aggregates 3 x 3); odd
    patch: int = Field(8, ge=1)  # pixels: side of the non-overlapping patches (the VAE's factor: one patch per latent cell)


class PatchKNNMethod(Method):
    name = "patchknn"
    params = PatchKNNParams
    record_blocks = ("model", "patchknn", "fewshot", "latents")
    reads = "latents"  # or pixels: `inputs` reads model.json
    learns_from = "evaluate"
    own_image_score = True  # the maximum of its map, as PatchCore
    per_category = True

    def check(self, params: CoreParams) -> None:
        knn = params.patchknn
        if knn.neighbourhood % 2 == 0:
            raise Invalid("patchknn.neighbourhood", f"{knn.neighbourhood} has no centre cell; use an odd side (1, 3, 5)")
        if knn.features == "pixels" and params.model.image_size % knn.patch:
            raise Invalid("patchknn.patch", f"{knn.patch} does not divide model.image_size={params.model.image_size}")
        if params.evaluate.threshold == "fixed":
            raise Invalid("evaluate.threshold", f"{self.off_unit_scale({})}: fit thresholds on the validation split (f1)")

    def off_unit_scale(self, record: dict) -> str | None:
        return "patchknn's maps are feature distances, not in [0, 1]"

    def scores_together(self, record: dict) -> bool:
        return bool(record["fewshot"].get("mutual"))

    def inputs(self, record: dict) -> str:
        return record["patchknn"]["features"]

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        from d2dprompt.methods.patchknn.train import run

        return run(self, params, job)

    def build(self, params: CoreParams, record: dict) -> PatchKNN:
        """The memories' shapes come from model.json; the frozen VAE (a plain attribute) encodes predict's images."""
        from d2dprompt.methods.patchknn.model import PatchKNN

        knn = params.patchknn
        model = PatchKNN(record["memory_shapes"], knn.features, knn.neighbourhood, knn.patch)
        if knn.features == "latents":
            from d2dprompt.core.models import load_vae

            model.__dict__["vae"] = load_vae(params.model.pretrained, params.model.tiny_seed)
        return model

    def load_weights(self, model: PatchKNN, weights: dict[str, torch.Tensor], record: dict) -> PatchKNN:
        """model.safetensors keys each memory by its category."""
        model.load_state_dict({f"memory_{model.names.index(name)}": rows for name, rows in weights.items()})
        return model.eval()

    def encode(self, model: PatchKNN, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """Latents exactly as the latents stage stores them (its dtype), or [0, 1] pixels."""
        if model.kind == "pixels":
            return super().encode(model, images, device)
        from d2dprompt.core.data.latent_store import LATENT_DTYPE
        from d2dprompt.core.models import encode_with

        return encode_with(model.vae, images, device).to(LATENT_DTYPE)

    def graph_inputs(self, model: PatchKNN, pixels: torch.Tensor) -> torch.Tensor:
        from d2dprompt.methods.graph import latents_of

        return pixels if model.kind == "pixels" else latents_of(model.vae, pixels)

    def export_tolerance(self, record: dict) -> float:
        """Latent features are distances between fp16-rounded latents: one latent rounding the other way moves a
        map by up to 2.5e-3 on the sample (maps up to 28); pixel features are exact to 1e-4 (base.py)."""
        return 1e-2 if record["patchknn"]["features"] == "latents" else super().export_tolerance(record)

    def scorer(self, model: PatchKNN, record: dict, scoring: Scoring, device: torch.device):
        from d2dprompt.core.eval.maps import to_image_size

        together, interval = self.scores_together(record), record["fewshot"]["interval"]

        def score(inputs: torch.Tensor, categories: list) -> tuple[torch.Tensor, torch.Tensor]:
            name = record["categories"][category_index(record, categories[0], self.name)]  # evaluate and predict give one category per batch
            distances = model.mutual(inputs.float().to(device), interval) if together else model(inputs.float().to(device), name)
            maps = to_image_size(distances, scoring.map_size, scoring.sigma)
            return maps.cpu(), maps.flatten(1).amax(1).cpu()

        return score
