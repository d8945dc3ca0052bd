"""Numbers with error bars: bootstrap intervals over test images, paired comparisons, and seed tables.

Resampling unit: the test IMAGE (pixels of one image are not independent), stratified by image label:
each replica draws the normal images and the anomalous images separately, with replacement, each to
its own count, so every replica keeps the test set's class balance. A replica is a vector w of image
multiplicities; every metric is a function of w computed from per-image sufficient statistics that are
built once, so no replica touches pixels:
- image_AUROC, pixel_AUROC: exact. C[i, j] = pairs (positive of image i, negative of image j) with the
  positive scoring higher, ties counting half; AUROC(w) = w^T C w / (P(w) N(w)). At w = 1 this is the
  Mann-Whitney AUROC of metrics.py exactly.
- pixel_AUPRO: per-image normal counts and per-region overlaps on a shared threshold grid (quantiles
  of the pooled normal scores, dense near FPR 0); the curve of each replica is integrated as metrics.py
  does (trapezoids from (0, 0), linear interpolation at fpr_limit). At w = 1 it is within ~2e-4 of
  the exact value unless large ties widen a grid step (3e-7 measured at MVTec AD size; tested).
- AUPIMO (mean over anomalous images): pimo.WeightedAUPIMO, on the exact metric's own threshold grid
  with the replica's shared FPR recomputed from the weighted normal images. At w = 1 it equals
  pimo.aupimo to rounding (tested).
The reported value is always the exact metric (metrics.py / pimo.py); the replicas only give the spread.
Intervals are percentile intervals. A metric undefined on a replica (say, no anomalous pixel drawn) is
left out of that replica, and each result says how many replicas it stands on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .metrics import image_metrics, label_regions, pixel_metrics
from .pimo import FPR_BOUNDS, NUM_THRESHOLDS, WeightedAUPIMO, check_pixels

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "AUPIMO")
_BLOCK = 128  # replicas per vectorised step: (block x grid) float64 scratch stays near 10 MiB
_PRO_LINEAR = 4096  # uniform pooled-FPR steps: chord error < (step / 2) / fpr_limit = 1.5 / 8192 ~ 2e-4
_PRO_LOG = 256  # extra log-spaced FPR levels from 1 / (normal pixels) to fpr_limit: PRO often jumps near FPR 0
_PRO_SPAN = 1.5  # the grid runs to 1.5 x fpr_limit so a replica's curve crosses the limit inside it


@dataclass(frozen=True)
class Interval:
    """A metric with its interval; `n_used` = replicas (or seeds) it stands on."""

    value: float
    lo: float
    hi: float
    n_used: int


@dataclass(frozen=True)
class Difference:
    """metric(a) - metric(b) with its interval and two-sided p-value for "no difference"."""

    diff: float
    lo: float
    hi: float
    p_value: float
    n_used: int


def resample_weights(labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, N) image multiplicities: normal and anomalous images drawn separately, with replacement.

    Reproducible: numpy.random.default_rng(seed) draws all normal indices, then all anomalous ones.
    """
    labels = np.asarray(labels, dtype=bool)
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples: expected a positive integer, got {n_resamples}")
    rng = np.random.default_rng(seed)
    shape = (int(n_resamples), labels.size)
    rows = np.arange(shape[0])[:, None] * shape[1]
    weights = np.zeros(shape)
    for stratum in (np.flatnonzero(~labels), np.flatnonzero(labels)):
        if stratum.size:
            drawn = stratum[rng.integers(0, stratum.size, size=(shape[0], stratum.size))]
            weights += np.bincount((rows + drawn).ravel(), minlength=weights.size).reshape(shape)
    return weights


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


class _ImageAUROC:
    """image_AUROC of weighted images, exact: pairs[i, j] = 1 (0.5 on a tie) when positive i beats negative j."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        self.exact = {"image_AUROC": image_metrics(labels, scores)["image_AUROC"]}
        self.pos, self.neg = np.flatnonzero(labels), np.flatnonzero(~labels)
        sp, sn = scores[self.pos][:, None], scores[self.neg][None, :]
        self.pairs = (sp > sn) + 0.5 * (sp == sn)

    def replicas(self, w: np.ndarray) -> dict[str, np.ndarray]:
        wp, wn = w[:, self.pos], w[:, self.neg]
        return {"image_AUROC": _ratio(np.einsum("bi,ij,bj->b", wp, self.pairs, wn), wp.sum(1) * wn.sum(1))}


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Row-wise trapezoidal area under (x, y) up to x = limit (interpolated there), divided by limit."""
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    end = np.minimum(x1, limit)
    with np.errstate(divide="ignore", invalid="ignore"):
        y_end = y0 + (y1 - y0) * np.where(x1 > x0, (end - x0) / (x1 - x0), 0.0)
    return np.where(x0 < limit, (end - x0) * (y0 + y_end) / 2, 0.0).sum(axis=1) / limit


class _PixelStats:
    """pixel_AUROC (exact pair counts) and pixel_AUPRO (shared threshold grid) of weighted images."""

    def __init__(self, masks: np.ndarray, maps: np.ndarray, fpr_limit: float):
        exact = pixel_metrics(masks, maps, fpr_limit)
        self.exact = {name: exact[name] for name in ("pixel_AUROC", "pixel_AUPRO")}
        self.fpr_limit = fpr_limit
        n = len(maps)
        flat, anomalous = maps.reshape(n, -1), masks.reshape(n, -1)
        normals = [np.sort(flat[j][~anomalous[j]]) for j in range(n)]
        self.n_neg = np.array([v.size for v in normals], dtype=np.float64)
        self.n_pos = anomalous.sum(axis=1).astype(np.float64)
        self.pos_images = np.flatnonzero(self.n_pos)
        if np.isnan(self.exact["pixel_AUROC"]):  # one pixel class only: both metrics stay undefined
            return
        self._pairs(flat, anomalous, normals)
        self._pro_grid(masks, maps, normals)

    def _pairs(self, flat: np.ndarray, anomalous: np.ndarray, normals: list[np.ndarray]) -> None:
        values = flat[anomalous]  # image-major order
        image = np.repeat(np.arange(self.pos_images.size), self.n_pos[self.pos_images].astype(np.int64))
        order = np.argsort(values, kind="stable")  # sorted queries keep searchsorted cache-friendly
        values, image = values[order], image[order]
        self.pairs = np.zeros((self.pos_images.size, len(normals)))
        for j, neg in enumerate(normals):
            if neg.size == 0:
                continue
            below = np.searchsorted(neg, values, side="left").astype(np.float64)
            tie = neg[np.minimum(below, neg.size - 1).astype(np.int64)] == values
            if tie.any():  # ties count half: add half the normals equal to the value
                below[tie] += 0.5 * (np.searchsorted(neg, values[tie], side="right") - below[tie])
            self.pairs[:, j] = np.bincount(image, weights=below, minlength=self.pos_images.size)

    def _pro_grid(self, masks: np.ndarray, maps: np.ndarray, normals: list[np.ndarray]) -> None:
        pooled = np.sort(np.concatenate(normals))
        levels = np.concatenate((
            np.linspace(0.0, min(1.0, _PRO_SPAN * self.fpr_limit), _PRO_LINEAR + 1)[1:],
            np.geomspace(1.0 / pooled.size, self.fpr_limit, _PRO_LOG),
        ))
        ranks = np.clip(np.ceil(levels * pooled.size).astype(np.int64), 1, pooled.size)
        # plus one just above every normal score: the exact curve's vertical start at FPR 0 (a perfect map gives 1)
        above = np.nextafter(pooled[-1:], np.array(np.inf, pooled.dtype))
        thresholds = np.unique(np.concatenate((pooled[pooled.size - ranks], above)))  # ascending
        # per image: normal pixels >= each threshold, columns in descending threshold = ascending FPR
        fp = [v.size - np.searchsorted(v, thresholds, side="left") for v in normals]
        self.fp = np.array(fp, dtype=np.float64)[:, ::-1]
        # PRO(w) = sum_i w_i (overlap sum of image i's regions) / sum_i w_i (regions of image i): per-image
        # sums, each anomalous pixel weighing 1 / (its region's size), keep the matrices (images x grid)
        regions, n_regions = label_regions(masks)
        region = regions[masks] - 1  # image-major, as the images' region labels are
        size = np.bincount(region, minlength=n_regions)
        image = np.repeat(np.arange(self.pos_images.size), self.n_pos[self.pos_images].astype(np.int64))
        first_pixels = np.unique(region, return_index=True)[1]
        self.n_regions = np.bincount(image[first_pixels], minlength=self.pos_images.size)
        bins = np.searchsorted(thresholds, maps[masks], side="right")  # thresholds <= value
        width = thresholds.size + 1
        overlap = np.bincount(image * width + bins, weights=1.0 / size[region], minlength=len(self.n_regions) * width)
        overlap = overlap.reshape(-1, width)
        at_or_above = overlap.sum(axis=1, keepdims=True) - np.cumsum(overlap, axis=1)[:, :-1]
        self.overlap = np.maximum(at_or_above, 0.0)[:, ::-1]  # rounding must not make a count negative

    def replicas(self, w: np.ndarray) -> dict[str, np.ndarray]:
        if np.isnan(self.exact["pixel_AUROC"]):
            return {name: np.full(len(w), np.nan) for name in self.exact}
        wa = w[:, self.pos_images]
        n_pos, n_neg = wa @ self.n_pos[self.pos_images], w @ self.n_neg
        auroc = _ratio(np.einsum("bi,ij,bj->b", wa, self.pairs, w), n_pos * n_neg)
        fpr = _ratio(w @ self.fp, n_neg[:, None])
        pro = np.minimum(_ratio(wa @ self.overlap, (wa @ self.n_regions)[:, None]), 1.0)
        zeros, ones = np.zeros((len(w), 1)), np.ones((len(w), 1))
        aupro = _area_to(np.hstack((zeros, fpr, ones)), np.hstack((zeros, pro, ones)), self.fpr_limit)
        aupro[(n_pos == 0) | (n_neg == 0)] = np.nan
        return {"pixel_AUROC": auroc, "pixel_AUPRO": aupro}


class _PimoStats:
    """Mean AUPIMO over anomalous images (pimo.WeightedAUPIMO: exact at w = 1)."""

    def __init__(self, masks: np.ndarray, maps: np.ndarray, bounds: tuple[float, float], num_thresholds=NUM_THRESHOLDS):
        self.weighted = WeightedAUPIMO(masks, maps, bounds, num_thresholds)
        self.exact = {"AUPIMO": self.weighted.exact.mean}

    def replicas(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {"AUPIMO": self.weighted(w)}


def _check(labels, scores, masks, maps) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    labels = np.asarray(labels).ravel()
    if labels.size == 0 or (labels.dtype != bool and not np.isin(labels, (0, 1)).all()):
        raise ValueError("labels: expected a non-empty array of 0/1 (or boolean) image labels")
    labels = labels.astype(bool)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.size != labels.size or not np.isfinite(scores).all():
            raise ValueError(f"scores: expected {labels.size} finite image scores, got {scores.size} (or NaN/inf)")
    if (masks is None) != (maps is None):
        raise ValueError("masks/maps: give both or neither")
    if masks is not None:
        masks, maps = check_pixels(masks, maps)
        if len(maps) != labels.size:
            raise ValueError(f"masks/maps: expected {labels.size} images (one per label), got {len(maps)}")
        mislabelled = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1) & ~labels)
        if mislabelled.size:
            raise ValueError(f"labels: image {mislabelled[0]} is labelled normal but its mask has anomalous pixels")
    return labels, scores, masks, maps


def _select(metrics: tuple[str, ...] | None, has_scores: bool, has_pixels: bool) -> tuple[str, ...]:
    available = (("image_AUROC",) if has_scores else ()) + (METRICS[1:] if has_pixels else ())
    if metrics is None:
        return available
    missing = [name for name in metrics if name not in available]
    if missing:
        raise ValueError(f"metrics: {missing} not available from these inputs (choose from {list(available)})")
    return tuple(metrics)


class _Method:
    """Exact values and replica function of the requested metrics of one method's outputs."""

    def __init__(self, labels, scores, masks, maps, names, fpr_limit, pimo_bounds):
        self.parts = []
        if "image_AUROC" in names:
            self.parts.append(_ImageAUROC(labels, scores))
        if {"pixel_AUROC", "pixel_AUPRO"} & set(names):
            self.parts.append(_PixelStats(masks, maps, fpr_limit))
        if "AUPIMO" in names:
            self.parts.append(_PimoStats(masks, maps, pimo_bounds))
        self.names = names
        self.exact = {name: value for part in self.parts for name, value in part.exact.items() if name in names}

    def replicas(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        blocks = [{k: v for part in self.parts for k, v in part.replicas(weights[i : i + _BLOCK]).items()}
                  for i in range(0, len(weights), _BLOCK)]
        return {name: np.concatenate([block[name] for block in blocks]) for name in self.names}


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must lie in (0, 1), got {confidence}")


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    return tuple(float(q) for q in np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2]))


def metric_replicas(
    labels: np.ndarray, scores: np.ndarray | None, masks: np.ndarray | None = None, maps: np.ndarray | None = None,
    *, n_resamples: int, seed: int, fpr_limit: float = 0.3, pimo_bounds: tuple[float, float] = FPR_BOUNDS,
    metrics: tuple[str, ...] | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(exact value, (n_resamples,) replica values) of each metric (nan where a replica leaves it undefined).

    The replicas depend on the data only through the resampled images: two methods scored on the same
    images (same labels) with the same `seed` get the same draws, so their replicas subtract into a paired
    comparison, and replicas of several categories average into the replicas of their mean.
    """
    labels, scores, masks, maps = _check(labels, scores, masks, maps)
    names = _select(metrics, scores is not None, masks is not None)
    method = _Method(labels, scores, masks, maps, names, fpr_limit, pimo_bounds)
    return {name: float(method.exact[name]) for name in names}, method.replicas(resample_weights(labels, n_resamples, seed))


def interval_of(value: float, replicas: np.ndarray, confidence: float) -> Interval:
    """The percentile interval of the finite `replicas` around the exact `value`; nan bounds when none is."""
    _check_confidence(confidence)
    used = replicas[np.isfinite(replicas)]
    if np.isnan(value) or used.size == 0:
        return Interval(float(value), float("nan"), float("nan"), 0)
    return Interval(float(value), *_percentiles(used, confidence), int(used.size))


def difference_of(diff: float, replicas: np.ndarray, confidence: float) -> Difference:
    """A paired difference from its exact value and its replicas (replicas of a minus replicas of b)."""
    _check_confidence(confidence)
    used = replicas[np.isfinite(replicas)]
    if np.isnan(diff) or used.size == 0:
        return Difference(float(diff), float("nan"), float("nan"), float("nan"), 0)
    return Difference(float(diff), *_percentiles(used, confidence), p_value(used), int(used.size))


def bootstrap_intervals(
    labels: np.ndarray, scores: np.ndarray | None, masks: np.ndarray | None = None, maps: np.ndarray | None = None,
    *, n_resamples: int, seed: int, confidence: float = 0.95, fpr_limit: float = 0.3,
    pimo_bounds: tuple[float, float] = FPR_BOUNDS, metrics: tuple[str, ...] | None = None,
) -> dict[str, Interval]:
    """Exact metric and percentile bootstrap interval of each metric, resampling test images (stratified).

    `labels`, `scores`: (N,) image labels and scores; `masks`, `maps`: (N, H, W) or None (image metric
    only). `metrics`: a subset of METRICS (default: all the inputs allow); AUPIMO raises when its
    `pimo_bounds` are out of the data's reach (pimo.aupimo), so leave it out for small test sets.
    A metric undefined on the test set (one class only) gives nan with n_used = 0.
    """
    _check_confidence(confidence)
    exact, replicas = metric_replicas(labels, scores, masks, maps, n_resamples=n_resamples, seed=seed, fpr_limit=fpr_limit,
                                      pimo_bounds=pimo_bounds, metrics=metrics)
    return {name: interval_of(exact[name], replicas[name], confidence) for name in exact}


def p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller tail of the replicas at 0.

    p = min(1, 2 min((1 + #{d <= 0}) / (B + 1), (1 + #{d >= 0}) / (B + 1))): about the smallest alpha at
    which the (1 - alpha) percentile interval excludes 0, with the +1 of Monte Carlo p-values (Davison &
    Hinkley 1997, ch. 4) so B replicas never claim p = 0. Replicas at exactly 0 count against both signs.
    """
    n = differences.size
    tail = min(np.count_nonzero(differences <= 0), np.count_nonzero(differences >= 0))
    return float(min(1.0, 2.0 * (1 + tail) / (n + 1)))


def paired_comparison(
    labels: np.ndarray, masks: np.ndarray | None,
    a: tuple[np.ndarray | None, np.ndarray | None], b: tuple[np.ndarray | None, np.ndarray | None],
    *, n_resamples: int, seed: int, confidence: float = 0.95, fpr_limit: float = 0.3,
    pimo_bounds: tuple[float, float] = FPR_BOUNDS, metrics: tuple[str, ...] | None = None,
) -> dict[str, Difference]:
    """metric(a) - metric(b) of two methods on the same test images, with a paired bootstrap.

    `a`, `b`: (image scores, maps) of each method (maps None when `masks` is None). Every replica
    resamples the SAME images for both methods, so what the two share (hard images) cancels.
    Reading it: `diff` is the exact difference; [lo, hi] its percentile interval; `p_value` tests "no
    difference": p < 0.05 means the 95 % interval excludes 0 (a tells apart from b), p = 1 means the
    replicas fall on both sides of 0 equally often (or the methods are identical). The smallest p that
    B replicas can give is 2 / (B + 1).
    """
    _check_confidence(confidence)
    if (a[0] is None) != (b[0] is None):
        raise ValueError("a/b: give image scores for both methods or for neither")
    options = dict(n_resamples=n_resamples, seed=seed, fpr_limit=fpr_limit, pimo_bounds=pimo_bounds, metrics=metrics)
    (exact_a, ra), (exact_b, rb) = (metric_replicas(labels, scores, masks, maps, **options) for scores, maps in (a, b))
    return {name: difference_of(exact_a[name] - exact_b[name], ra[name] - rb[name], confidence) for name in exact_a}


def seed_mean(values: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean over training seeds with a Student-t interval (n - 1 degrees of freedom); nan bounds for one seed."""
    _check_confidence(confidence)
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("values: expected one finite value per seed")
    mean = float(values.mean())
    if values.size < 2:
        return Interval(mean, float("nan"), float("nan"), 1)
    half = float(stats.t.ppf((1 + confidence) / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return Interval(mean, mean - half, mean + half, int(values.size))


def seed_difference(values_a: np.ndarray, values_b: np.ndarray, confidence: float = 0.95) -> Difference:
    """Mean of a - b over the same seeds, its Student-t interval and the paired t-test's two-sided p."""
    a, b = np.asarray(values_a, dtype=np.float64).ravel(), np.asarray(values_b, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"values_a/values_b: one value per seed for both, got {a.size} and {b.size}")
    interval = seed_mean(a - b, confidence)
    d = a - b
    if d.size < 2:
        p = float("nan")
    elif np.all(d == d[0]):  # no spread: the t statistic is 0/0 or infinite
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return Difference(interval.value, interval.lo, interval.hi, p, interval.n_used)


def indistinguishable(a: Interval | Difference, b: Interval | None = None, *, alpha: float = 0.05) -> bool:
    """Whether two table rows cannot be told apart: two Intervals overlap, or a Difference has p >= alpha.

    Overlapping intervals are the cautious reading of unpaired rows; prefer a paired Difference
    (paired_comparison, seed_difference) when both rows come from the same images or seeds.
    """
    if isinstance(a, Difference):
        if b is not None:
            raise ValueError("indistinguishable: give two Intervals or one Difference")
        return bool(not a.p_value < alpha)
    if b is None:
        raise ValueError("indistinguishable: give two Intervals or one Difference")
    return bool(a.lo <= b.hi and b.lo <= a.hi)
