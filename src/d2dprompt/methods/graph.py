"""What export.py traces: one module per trained run (and category) from pixels to evaluate's maps and image scores.

Every graph reads the same input, (B, 3, S, S) float32 pixels in [0, 1] at the method's input side (the image
resized as `core.data.images.resize_rgb` does, divided by 255), and returns (maps (B, map_size, map_size), image
scores (B,)). What is fixed once a run is trained (a category's network or memory, the prompts' text-encoder states,
the seed's noise) is a constant of the graph. Pure torch, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from d2dprompt.methods.base import Method, Scoring


class NotExportable(ValueError):
    """A method, or a trained run's setting, with no ONNX graph; the message says why."""


def latents_of(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> latents as the latents stage stores them: the VAE's mean x its scaling factor, rounded to the
    stored dtype (evaluate and predict read latents at that precision, so the graph must too), back in float32."""
    from d2dprompt.core.data.latent_store import LATENT_DTYPE
    from d2dprompt.core.models import vae_latents

    return vae_latents(vae, pixels * 2 - 1).to(LATENT_DTYPE).float()


class ScorerGraph(nn.Module):
    """`Method.graph_inputs`, then the method's own batch scorer for one category: the graph of every method whose
    scorer is plain torch on its inputs and holds nothing to fix first (DRAEM, patchknn), so the exported computation
    is evaluate's."""

    def __init__(self, method: Method, model: nn.Module, record: dict, scoring: Scoring, category: str | None):
        super().__init__()
        self.model, self.method, self.category = model, method, category
        self.score = method.scorer(model, record, scoring, torch.device("cpu"))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.method.graph_inputs(self.model, pixels)
        return self.score(inputs, [self.category] * int(pixels.shape[0]))  # a trace-time count: only the category is read
