"""D2D-Prompt, this project's method: learnable prompts read through a frozen Stable Diffusion UNet's cross-attention.

model.py (the segmenter: frozen SD + prompts -> maps), attention.py (capturing cross-attention in the graph),
loss.py (the loss terms), query_cache.py (cached-query training), train.py (train@d2dprompt). It reads the shared
model / prompt / attention / loss / train blocks and has no block of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2dprompt.methods.base import Method, Scoring, TrainJob

if TYPE_CHECKING:
    import numpy as np
    import torch

    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.d2dprompt.model import D2DSegmenter


class D2DPromptMethod(Method):
    name = "d2dprompt"
    record_blocks = ("model", "prompt", "attention", "loss", "train")
    reads = "latents"
    multi_process = True

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        from d2dprompt.methods.d2dprompt.train import run

        return run(self, params, job)

    def build(self, params: CoreParams, record: dict) -> D2DSegmenter:
        from d2dprompt.core.models import load_frozen
        from d2dprompt.methods.d2dprompt.model import build_segmenter

        sd = load_frozen(params.model.pretrained, params.model.tiny_seed)
        return build_segmenter(sd, params.prompt, params.attention, params.model)

    def load_weights(self, model: D2DSegmenter, weights: dict[str, torch.Tensor], record: dict) -> D2DSegmenter:
        model.prompts.load_state_dict(weights)
        return model.eval()

    def encode(self, model: D2DSegmenter, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """Latents exactly as the latents stage stores them (its dtype), so an image scores as evaluate scored it."""
        from d2dprompt.core.data.latent_store import LATENT_DTYPE
        from d2dprompt.core.models import encode

        return encode(model.sd, images, device).to(LATENT_DTYPE)

    def scorer(self, model: D2DSegmenter, record: dict, scoring: Scoring, device: torch.device):
        from d2dprompt.methods.d2dprompt.model import latent_maps

        noise_seed = record["model"]["noise_seed"]
        return lambda latents, categories: latent_maps(model, latents, noise_seed, scoring, device)
