"""DeCo-Diff (farzad-bz/DeCo-Diff, CVPR 2025): model.py (the deviation-predicting UNet in the frozen VAE's latent
space, its repainting and map), train.py (train@decodiff: one class-conditioned model for all categories)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from d2dprompt.core.runtime.config import Block, Invalid
from d2dprompt.core.vae_factor import vae_factor
from d2dprompt.methods.base import Method, Scoring, TrainJob, category_index

if TYPE_CHECKING:
    import numpy as np
    import torch

    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.decodiff.model import DecoDiff


class DecoDiffParams(Block):
    """DeCo-Diff, trained from scratch on the latents stage's normal training latents; the paper's settings are in the README."""

    channels: list[Annotated[int, Field(ge=1)]] = Field([32, 64, 64], min_length=1)  # UNet widths per level, attention in the last
    layers_per_block: int = Field(1, ge=1)  # resnet blocks per UNet level
    timesteps: int = Field(10, ge=1)  # steps of the deviation schedule (the authors: 10)
    reverse_steps: int = Field(5, ge=1)  # DDIM steps from the image's own latent (the authors: 5 of 10)
    beta_start: float = Field(1e-4, gt=0, lt=1)  # linear betas over `timesteps`: abar falls to 0.60 (0.02: to 0.90, too little noise to learn from)
    beta_end: float = Field(0.1, gt=0, lt=1)
    mask_ratio: float = Field(0.7, ge=0, lt=1)  # per image, up to this share of latent patches is hidden from the UNet (the authors: 0.7)
    shuffle_ratio: float = Field(0.3, ge=0, le=1)  # per image, up to this share of the deviation is shuffled patches (the authors: 0.3)
    epochs: int = Field(300, ge=1)  # the authors: 800
    batch_size: int = Field(16, ge=1)  # the authors: 128
    lr: float = Field(1e-4, gt=0)  # AdamW, weight decay 1e-4, as the authors
    warmup_epochs: int = Field(10, ge=0)  # cosine schedule with linear warm-up, stepped per epoch, as the authors

    @model_validator(mode="after")
    def _steps_fit(self) -> DecoDiffParams:
        if self.reverse_steps > self.timesteps:
            raise Invalid("reverse_steps", f"must be <= decodiff.timesteps={self.timesteps}, got {self.reverse_steps}")
        if self.beta_start > self.beta_end:
            raise Invalid("beta_start", f"must be <= decodiff.beta_end={self.beta_end}, got {self.beta_start}")
        return self


class DecoDiffMethod(Method):
    name = "decodiff"
    params = DecoDiffParams
    record_blocks = ("model", "decodiff", "latents", "train")
    reads = "latents"
    learns_from = "evaluate"
    own_image_score = True  # the max of its own map

    def check(self, params: CoreParams) -> None:
        """The UNet halves the latents of model.image_size len(decodiff.channels) - 1 times."""
        levels, model = len(params.decodiff.channels), params.model
        side = model.image_size // vae_factor(model.pretrained)
        if side % 2 ** (levels - 1) or side // 2 ** (levels - 1) < 2:
            raise Invalid("decodiff.channels", f"{levels} levels halve the {side}x{side} latents of model.image_size={model.image_size} "
                          f"{levels - 1} times; use fewer levels or a larger image")

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        from d2dprompt.methods.decodiff.train import run

        return run(self, params, job)

    def network(self, params: CoreParams, record: dict) -> DecoDiff:
        """The untrained DeCo-Diff for the latents and categories a record names (what train@decodiff optimises)."""
        from d2dprompt.methods.decodiff.model import DecoDiff, build_unet

        d = params.decodiff
        channels, side = record["latent_shape"][0], record["latent_shape"][1]
        unet = build_unet(channels, side, d.channels, d.layers_per_block, len(record["categories"]))
        return DecoDiff(unet, d.timesteps, d.beta_start, d.beta_end, d.mask_ratio, d.shuffle_ratio)

    def build(self, params: CoreParams, record: dict) -> DecoDiff:
        """`network` with the frozen VAE its latents came from as `.vae` (a plain attribute: out of its state, moved by
        `place`): it encodes predict's images and decodes the repaintings."""
        from d2dprompt.core.models import load_vae

        model = self.network(params, record)
        model.__dict__["vae"] = load_vae(params.model.pretrained, params.model.tiny_seed)
        return model

    def load_weights(self, model: DecoDiff, weights: dict[str, torch.Tensor], record: dict) -> DecoDiff:
        model.unet.load_state_dict(weights)
        return model.eval()

    def benchmark(self, scale: str, device: torch.device, precision: str, steps: int) -> dict:
        from d2dprompt.methods.decodiff.bench import benchmark

        return benchmark(scale, device, precision, steps)

    def encode(self, model: DecoDiff, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """Latents exactly as the latents stage stores them (its dtype)."""
        from d2dprompt.core.data.latent_store import LATENT_DTYPE
        from d2dprompt.core.models import encode_with

        return encode_with(model.vae, images, device).to(LATENT_DTYPE)

    def graph_inputs(self, model: DecoDiff, pixels: torch.Tensor) -> torch.Tensor:
        from d2dprompt.methods.graph import latents_of

        return latents_of(model.vae, pixels)

    def export_graph(self, model: DecoDiff, record: dict, scoring: Scoring, category: str | None):
        """The VAE encoder, `reverse_steps` DDIM steps of the DiT unrolled (the scheduler's steps are fixed), both VAE
        decodings and the map, for one category's class label."""
        from d2dprompt.methods.decodiff.model import RepaintGraph

        return RepaintGraph(model, category_index(record, category, self.name), record["decodiff"]["reverse_steps"], scoring)

    def export_tolerance(self, record: dict) -> float:
        """A latent rounding to the neighbouring fp16 value runs through every DDIM step and both decodings: maps
        (in [0, 1]) move by up to 2.7e-4 on the sample (base.py)."""
        return 1e-3

    def scorer(self, model: DecoDiff, record: dict, scoring: Scoring, device: torch.device):
        import torch

        from d2dprompt.methods.decodiff.model import latent_maps

        steps = record["decodiff"]["reverse_steps"]

        def score(latents: torch.Tensor, categories: list) -> tuple[torch.Tensor, torch.Tensor]:
            classes = torch.tensor([category_index(record, c, self.name) for c in categories])  # its class label
            return latent_maps(model, latents, classes, steps, scoring, device)

        return score
