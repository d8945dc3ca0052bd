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

`shard_loss` is one process's share of `total_loss` in data-parallel training (train.py under torchrun):
each term written as a weighted sum over the batch's images, so the processes' shares add up to it.

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

from d2dprompt.core.eval.maps import top_mean  # the training image score, also the `fused` score's image term

CLAMP = 1e-6  # keeps logs finite


def _focal_map(p: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    q = p.clamp(CLAMP, 1 - CLAMP)
    return -(mask * (1 - q) ** gamma * q.log() + (1 - mask) * q**gamma * (1 - q).log())


def focal_loss(p: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    return _focal_map(p, mask, gamma).mean()


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, pred.ndim))
    inter = (pred * target).sum(dims)
    return 1 - (2 * inter + CLAMP) / (pred.sum(dims) + target.sum(dims) + CLAMP)


def dice_loss(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (_dice(p, mask) + _dice(1 - p, 1 - mask)).mean()


def image_loss(p: torch.Tensor, labels: torch.Tensor, top_percent: float) -> torch.Tensor:
    s = top_mean(p, top_percent).clamp(CLAMP, 1 - CLAMP)
    y = labels.to(s.dtype)
    per_image = F.binary_cross_entropy(s, y, reduction="none")
    positive = y > 0.5
    means = [per_image[group].mean() for group in (positive, ~positive) if group.any()]
    return torch.stack(means).mean()


def _entropy_map(p: torch.Tensor) -> torch.Tensor:
    q = p.clamp(CLAMP, 1 - CLAMP)
    return -(q * q.log() + (1 - q) * (1 - q).log()) / math.log(2)


def sharpness_loss(p: torch.Tensor) -> torch.Tensor:
    return _entropy_map(p).mean()


def _outside(mass: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B,): the share of each image's raw abnormal attention outside its defect."""
    return 1 - (mass * m).flatten(1).sum(1) / (mass.flatten(1).sum(1) + CLAMP)


def coverage_loss(abnormal_mass: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    anomalous = labels > 0.5
    if not anomalous.any():
        return abnormal_mass.sum() * 0  # keeps the graph, contributes nothing
    return _outside(abnormal_mass[anomalous], mask[anomalous]).mean()


def _disagreement(levels: torch.Tensor) -> torch.Tensor:
    return (levels - levels.mean(1, keepdim=True)) ** 2


def consistency_loss(levels: torch.Tensor) -> torch.Tensor:
    """levels (B, L, h, w); zero when a single level is read."""
    return _disagreement(levels).mean()


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
    _check_names(weights)
    p, mask = maps["anomaly"], mask.to(maps["anomaly"].dtype)
    terms = {
        "focal": lambda: focal_loss(p, mask, focal_gamma),
        "dice": lambda: dice_loss(p, mask),
        "image": lambda: image_loss(p, labels, image_top_percent),
        "sharpness": lambda: sharpness_loss(p),
        "coverage": lambda: coverage_loss(maps["abnormal_mass"], mask, labels),
        "consistency": lambda: consistency_loss(maps["anomaly_levels"]),
    }
    return _weighted(terms, weights, p)


def shard_loss(
    maps: dict[str, torch.Tensor],
    mask: torch.Tensor,
    labels: torch.Tensor,
    weights: dict[str, float],
    focal_gamma: float,
    image_top_percent: float,
    batch_labels: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """total_loss's share from some of a batch's images (data-parallel training: one process's rows).

    `maps`, `mask`, `labels` hold the shard, `batch_labels` the labels of the whole batch. Every term is
    a weighted sum over images: focal, dice, sharpness and consistency are means over the batch of
    per-image means (each image has as many pixels and levels), so an image weighs 1 / B; image weighs
    an image 1 / (classes present x images of its class), coverage an anomalous image 1 / anomalous images.
    The shards' shares (loss and each term) sum to total_loss of the whole batch, up to float rounding.
    """
    _check_names(weights)
    p, mask = maps["anomaly"], mask.to(maps["anomaly"].dtype)
    size, anomalous = batch_labels.numel(), labels > 0.5
    positives = int((batch_labels > 0.5).sum())
    classes = (positives > 0) + (positives < size)

    def per_image_mean(values: torch.Tensor) -> torch.Tensor:  # (B, ...) -> this shard's part of the batch mean
        return values.flatten(1).mean(1).sum() / size

    def image() -> torch.Tensor:
        s = top_mean(p, image_top_percent).clamp(CLAMP, 1 - CLAMP)
        per_image = F.binary_cross_entropy(s, labels.to(s.dtype), reduction="none")
        weight = [1 / (classes * count) if count else 0.0 for count in (positives, size - positives)]
        return (per_image * torch.where(anomalous, weight[0], weight[1])).sum()

    def coverage() -> torch.Tensor:
        if not positives:
            return maps["abnormal_mass"].sum() * 0  # keeps the graph, contributes nothing
        return _outside(maps["abnormal_mass"][anomalous], mask[anomalous]).sum() / positives

    terms = {
        "focal": lambda: per_image_mean(_focal_map(p, mask, focal_gamma)),
        "dice": lambda: (_dice(p, mask) + _dice(1 - p, 1 - mask)).sum() / size,
        "image": image,
        "sharpness": lambda: per_image_mean(_entropy_map(p)),
        "coverage": coverage,
        "consistency": lambda: per_image_mean(_disagreement(maps["anomaly_levels"])),
    }
    return _weighted(terms, weights, p)


def _check_names(weights: dict[str, float]) -> None:
    unknown = set(weights) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(f"unknown loss terms: {sorted(unknown)}")


def _weighted(terms: dict, weights: dict[str, float], like: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """sum of weight x term over the terms with a non-zero weight (the others are not computed), and their values."""
    total = like.new_zeros(())
    values: dict[str, float] = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        value = terms[name]()
        values[name] = float(value.detach())
        total = total + weight * value
    return total, values
