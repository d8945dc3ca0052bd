"""From latent-resolution anomaly maps to what is scored and shown. Pure torch, no I/O."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from d2dprompt.losses import image_score  # the training image term's score, used by `fused`


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


def image_scores(maps: torch.Tensor, method: str, top_percent: float, logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) -> (B,) image anomaly scores.

    max:   the maximum of the smoothed map, the field's usual score.
    topk:  mean of the top `top_percent` % of pixels: less sensitive to one hot pixel.
    fused: mean of `max` and the image-level probability `logits` (the training image term's
           score, computed on the unsmoothed latent map), as AnomalyCLIP fuses map and image scores.
    `method` is evaluate.score, one of these three (config.py checks it).
    """
    flat = maps.flatten(1)
    if method == "max":
        return flat.amax(1)
    if method == "topk":
        k = max(1, int(round(flat.shape[1] * top_percent / 100)))
        return flat.topk(k, dim=1).values.mean(1)
    if logits is None:
        raise ValueError("evaluate.score=fused needs the image-level scores")
    return 0.5 * (flat.amax(1) + logits)


def finish_maps(
    latent_maps: torch.Tensor, map_size: int, sigma: float, score: str, top_percent: float, image_top_percent: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent-size anomaly maps -> (maps at `map_size`, image scores): what evaluate and predict report.

    `image_top_percent` (loss.image_top_percent) makes the `fused` score's image term the one training used.
    """
    maps = to_image_size(latent_maps.float(), map_size, sigma)
    logits = image_score(latent_maps.float(), image_top_percent) if score == "fused" else None
    return maps, image_scores(maps, score, top_percent, logits)
