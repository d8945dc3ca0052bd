"""From latent-resolution anomaly maps to what is scored and shown. Pure torch, no I/O."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D kernel truncated at 4 sigma (scipy.ndimage.gaussian_filter's default)."""
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) separable Gaussian blur with reflected borders; sigma 0 returns the input."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def to_image_size(maps: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, h, w) latent maps -> (B, size, size): bilinear upsampling, then Gaussian smoothing (sigma in output pixels)."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,): the maximum of the smoothed map, the field's usual image score."""
    return maps.flatten(1).amax(1)
