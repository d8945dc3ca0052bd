"""Losses on the cross-attention maps. Pure torch; each term weighted by `loss.<name>` in params.yaml.

Notation, per image: p(x) in [0, 1] the anomaly map (abnormal share of prompt attention) at pixel x,
m(x) in {0, 1} the defect mask, y in {0, 1} the image label, A(x) >= 0 the raw attention mass on the
abnormal prompt's tokens, p_l(x) the anomaly map of attention level l, and mean() over pixels.

- focal:       mean over pixels of -[m (1 - p)^gamma log p + (1 - m) p^gamma log(1 - p)]
               (the 2-channel (normal, abnormal) map against the mask, as AnomalyCLIP; m may be
               fractional where a latent cell is partly defective).
- dice:        [1 - 2 sum(p m) / (sum p + sum m)] + [1 - 2 sum((1-p)(1-m)) / (sum(1-p) + sum(1-m))]
               (abnormal map vs mask, normal map vs 1 - mask), averaged over the batch.
- image:       class-balanced binary cross-entropy of s = mean of the top `loss.image_top_percent` %
               of p against y:
               0.5 * mean over anomalous images + 0.5 * mean over normal ones (the mean of the
               class present when a batch holds one class only).
- sharpness:   mean binary entropy H(p) / log 2 over pixels: 0 when every pixel is decided, 1 at p = 0.5.
- coverage:    over anomalous images, 1 - sum(A m) / sum(A): the share of the abnormal prompt's raw
               attention that falls outside the defect.
- consistency: mean over levels of mean((p_l - mean_l p_l)^2): the levels should agree.

Why the image term is balanced: K synthetic anomalies per normal training image make K/(K+1) of the
rows anomalous (2/3 by default). A plain BCE is then lowest, before any discrimination, at s = 2/3
for every image, so it pulled the whole map up while focal and dice pull the (mostly normal) pixels
down: the two fought over the map's overall level, and on the sample the logged image loss rose from
0.685 to 0.700 over 15 epochs. Trained alone it fell only to the prior's entropy (0.633 vs 0.637).
Balanced, a constant score costs log 2 whatever the class ratio, and the term can fall only by
separating anomalous from normal images, which is what it is for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLAMP = 1e-6  # keeps logs finite


def focal_loss(p: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    q = p.clamp(CLAMP, 1 - CLAMP)
    return -(mask * (1 - q) ** gamma * q.log() + (1 - mask) * q**gamma * (1 - q).log()).mean()


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, pred.ndim))
    inter = (pred * target).sum(dims)
    return 1 - (2 * inter + CLAMP) / (pred.sum(dims) + target.sum(dims) + CLAMP)


def dice_loss(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (_dice(p, mask) + _dice(1 - p, 1 - mask)).mean()


def image_score(p: torch.Tensor, top_percent: float) -> torch.Tensor:
    """(B, h, w) -> (B,): mean of the top `top_percent` % of pixels."""
    flat = p.flatten(1)
    k = max(1, int(round(flat.shape[1] * top_percent / 100)))
    return flat.topk(k, dim=1).values.mean(1)


def image_loss(p: torch.Tensor, labels: torch.Tensor, top_percent: float) -> torch.Tensor:
    s = image_score(p, top_percent).clamp(CLAMP, 1 - CLAMP)
    y = labels.to(s.dtype)
    per_image = F.binary_cross_entropy(s, y, reduction="none")
    positive = y > 0.5
    means = [per_image[group].mean() for group in (positive, ~positive) if group.any()]
    return torch.stack(means).mean()


def sharpness_loss(p: torch.Tensor) -> torch.Tensor:
    q = p.clamp(CLAMP, 1 - CLAMP)
    return (-(q * q.log() + (1 - q) * (1 - q).log()) / math.log(2)).mean()


def coverage_loss(abnormal_mass: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    anomalous = labels > 0.5
    if not anomalous.any():
        return abnormal_mass.sum() * 0  # keeps the graph, contributes nothing
    mass, m = abnormal_mass[anomalous], mask[anomalous]
    inside = (mass * m).flatten(1).sum(1) / (mass.flatten(1).sum(1) + CLAMP)
    return (1 - inside).mean()


def consistency_loss(levels: torch.Tensor) -> torch.Tensor:
    """levels (B, L, h, w); zero when a single level is read."""
    return ((levels - levels.mean(1, keepdim=True)) ** 2).mean()


LOSS_NAMES = ("focal", "dice", "image", "sharpness", "coverage", "consistency")


def total_loss(
    maps: dict[str, torch.Tensor],
    mask: torch.Tensor,
    labels: torch.Tensor,
    weights: dict[str, float],
    focal_gamma: float,
    image_top_percent: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms with non-zero weight; returns (loss, each term's unweighted value)."""
    unknown = set(weights) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"unknown loss terms: {sorted(unknown)}")
    p, mask = maps["anomaly"], mask.to(maps["anomaly"].dtype)
    terms = {
        "focal": lambda: focal_loss(p, mask, focal_gamma),
        "dice": lambda: dice_loss(p, mask),
        "image": lambda: image_loss(p, labels, image_top_percent),
        "sharpness": lambda: sharpness_loss(p),
        "coverage": lambda: coverage_loss(maps["abnormal_mass"], mask, labels),
        "consistency": lambda: consistency_loss(maps["anomaly_levels"]),
    }
    total = p.new_zeros(())
    values: dict[str, float] = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        value = terms[name]()
        values[name] = float(value.detach())
        total = total + weight * value
    return total, values
