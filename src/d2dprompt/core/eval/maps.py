"""From latent-resolution anomaly maps to what is scored and shown. Pure torch, no I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: the kernel ends at 4 sigma


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D kernel, float64, truncated at 4 sigma with scipy.ndimage.gaussian_filter's radius int(4 sigma + 0.5)."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) separable Gaussian filter as scipy.ndimage.gaussian_filter(mode='reflect', truncate=4) on each map:
    the border is reflected with its edge sample repeated (d c b a | a b c d | d c b a), which torch's own 'reflect'
    padding (scipy's 'mirror') does not do. sigma 0 returns the input. One blur for every map (tested against scipy)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.dtype).to(maps.device)
    radius = kernel.numel() // 2
    out = maps[:, None]
    for dim in (2, 3):
        pad = [0, 0, radius, radius] if dim == 2 else [radius, radius, 0, 0]
        out = _symmetric_pad(out, pad)
        weight = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        out = F.conv2d(out, weight)
    return out[:, 0]


def _symmetric_pad(x: torch.Tensor, pad: list[int]) -> torch.Tensor:
    """scipy's 'reflect' (d c b a | a b c d | d c b a): torch has no such mode, so flip and concatenate."""
    left, right, top, bottom = pad
    for dim, before, after in ((3, left, right), (2, top, bottom)):
        while before or after:  # a radius wider than the map reflects repeatedly
            size = x.shape[dim]
            b, a = min(before, size), min(after, size)
            x = torch.cat([x.narrow(dim, 0, b).flip(dim), x, x.narrow(dim, size - a, a).flip(dim)], dim)
            before, after = before - b, after - a
    return x


def top_mean(maps: torch.Tensor, top_percent: float) -> torch.Tensor:
    """(B, h, w) -> (B,): mean of the top `top_percent` % of pixels (at least one)."""
    flat = maps.flatten(1)
    k = max(1, int(round(int(flat.shape[1]) * top_percent / 100)))  # int(): a constant when traced for export (sides are fixed)
    return flat.topk(k, dim=1).values.mean(1)


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
        return top_mean(maps, top_percent)
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
    logits = top_mean(latent_maps.float(), image_top_percent)  # the training image term's score if score == "fused" else None
    return maps, image_scores(maps, score, top_percent, logits)
