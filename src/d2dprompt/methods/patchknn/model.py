"""patchknn's torch model: patch features (VAE latent cells with their neighbourhood, or raw pixel patches) and their
nearest-neighbour distance to a memory of normal ones. No learning, no I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2dprompt.methods.patch_memory import distance_map, mutual_map

LAYER = "features"  # the one "layer" of patch_memory.distance_map


def patch_features(inputs: torch.Tensor, kind: str, neighbourhood: int, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, H, W) -> ((B, cells, D), the grid (h, w)). Latents: each cell with its `neighbourhood` x `neighbourhood`
    neighbours concatenated (PatchCore's local context; borders replicated), D = C x n^2. Pixels in [0, 1]:
    non-overlapping `patch` x `patch` patches, D = 3 x patch^2."""
    x = inputs.float()
    if kind == "latents":
        pad = neighbourhood // 2
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate") if pad else x
        cells = F.unfold(padded, neighbourhood)
        grid = tuple(x.shape[-2:])
    else:
        cells = F.unfold(x, patch, stride=patch)
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    return cells.transpose(1, 2), grid


class PatchKNN(nn.Module):
    """The memories of a run's categories ('<dataset>/<category>' -> (rows, D)), held as buffers so `place` moves them."""

    def __init__(self, shapes: dict[str, list[int]], kind: str, neighbourhood: int, patch: int):
        super().__init__()
        self.names = list(shapes)
        self.kind, self.neighbourhood, self.patch = kind, neighbourhood, patch
        for index, shape in enumerate(shapes.values()):
            self.register_buffer(f"memory_{index}", torch.zeros(shape))

    def memory(self, category: str) -> torch.Tensor:
        return getattr(self, f"memory_{self.names.index(category)}")

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor, category: str) -> torch.Tensor:
        """(B, C, H, W) of one category -> (B, h, w) nearest distances at the feature grid."""
        features, grid = patch_features(inputs, self.kind, self.neighbourhood, self.patch)
        return distance_map({LAYER: features}, {LAYER: self.memory(category)}, {LAYER: 0}, grid)

    @torch.no_grad()
    def mutual(self, inputs: torch.Tensor, interval: float) -> torch.Tensor:
        """(N, C, H, W) of one category scored against each other (MuSc) -> (N, h, w)."""
        features, grid = patch_features(inputs, self.kind, self.neighbourhood, self.patch)
        return mutual_map({LAYER: features}, {LAYER: 0}, grid, interval)
