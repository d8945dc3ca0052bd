"""Image- and pixel-level anomaly metrics, computed exactly as the field defines them (pure numpy).

Names follow anomalib: image_AUROC, image_AP, image_F1Max, pixel_AUROC, pixel_AP, pixel_F1Max,
pixel_AUPRO. Pixel metrics are exact (no binning, no threshold grid) and fast: positive and negative
pixels are never sorted together. Only the anomalous pixels are sorted; every other pixel is counted
into a histogram over order-preserving integer keys of its score, and only the pixels whose bucket
also holds an anomalous pixel are sorted to resolve order exactly. Every metric then follows from,
for each distinct anomalous score v, how many normal pixels score < v and <= v (ties count half
in AUROC and make a diagonal step in the curves, as in scikit-learn and the MVTec AD code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

_CHUNK = 1 << 22  # pixels per counting step: scratch buffers stay small and are reused (page faults are slow)
_MAX_BUCKET_BITS = 24  # 16M buckets (64 MiB of counts): few normal pixels share a bucket with an anomalous one
_IMAGES_PER_LABEL_CALL = 64  # masks labelled per scipy call, into one reused 16 MiB label buffer at 256 px
# 8-connectivity (full 3x3 structure) as in the MVTec AD evaluation code (`label(gt, np.ones((3, 3)))`)
# and anomalib (OpenCV connectedComponents, default connectivity 8); depth 1: images never connect.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected regions of each (N, H, W) mask; labels are unique across images, 0 = normal."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected shape (N, H, W), got {masks.shape}")
    labels, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    return labels, int(n_regions)


def _region_of_pixels(masks: np.ndarray, positive_index: np.ndarray) -> tuple[np.ndarray, int]:
    """label_regions(masks).ravel()[positive_index] without materialising the full label array."""
    per_image = masks[0].size
    step = _IMAGES_PER_LABEL_CALL
    buffer = np.empty((min(step, len(masks)),) + masks.shape[1:], dtype=np.int32)
    bounds = np.searchsorted(positive_index, np.arange(0, len(masks) + step, step) * per_image)
    regions, n_regions = np.empty(positive_index.size, dtype=np.int64), 0
    for chunk, first in enumerate(range(0, len(masks), step)):
        lo, hi = bounds[chunk], bounds[chunk + 1]
        if lo == hi:
            continue
        out = buffer[: len(masks[first : first + step])]
        n = ndimage.label(masks[first : first + step], structure=_REGION_STRUCTURE, output=out)
        regions[lo:hi] = out.ravel()[positive_index[lo:hi] - first * per_image] + n_regions
        n_regions += n
    return regions, n_regions


def _key_types(dtype: np.dtype) -> tuple[type, type, int]:
    return (np.uint64, np.int64, 64) if dtype == np.float64 else (np.uint32, np.int32, 32)


def _float_keys(values: np.ndarray, signed: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Unsigned integer keys in the order of the floats (-0.0 and +0.0 share one); NaN is refused.

    Without sign bits (signed=False) the raw bits already sort like the floats. Otherwise non-negative
    floats get their bits with the sign bit set and negative floats minus their bits, so larger
    magnitudes sort lower and -0.0 lands exactly on +0.0. One call site must use one `signed`.
    """
    uint, sint, bits = _key_types(values.dtype)
    out = np.empty(values.shape, uint) if out is None else out
    if np.isnan(values, out=out.view(bool)[: values.size]).any():
        raise ValueError("scores: contain NaN")
    if not signed:
        np.copyto(out, values.view(uint))
        return out
    sign = np.right_shift(values.view(sint), bits - 1).view(uint)  # 0 or all ones
    np.bitwise_or(sign, uint(1 << (bits - 1)), out=out)
    np.bitwise_xor(values.view(uint), out, out=out)
    return np.subtract(out, sign, out=out)  # subtracting all ones adds 1 (modulo 2**bits)


def _has_sign_bits(scores: np.ndarray) -> bool:
    return bool(scores.view(_key_types(scores.dtype)[1]).min() < 0)


def _as_scores(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected real-valued scores, got dtype {values.dtype}")
    dtype = np.float64 if values.dtype in (np.float64, np.int64, np.uint64, np.int32, np.uint32) else np.float32
    return np.ascontiguousarray(values, dtype=dtype).ravel()


@dataclass(frozen=True)
class _Curve:
    """Per distinct anomalous score (descending): what a threshold at that score lets through."""

    values: np.ndarray  # distinct anomalous scores, descending
    pos_count: np.ndarray  # anomalous pixels at exactly that score
    neg_ge: np.ndarray  # normal pixels scoring >= value
    neg_gt: np.ndarray  # normal pixels scoring > value
    weight: np.ndarray  # summed PRO weight of the anomalous pixels at that score
    n_pos: int
    n_neg: int


def _count_normals_below(
    scores: np.ndarray, anomalous: np.ndarray, unique_keys: np.ndarray, signed: bool
) -> tuple[np.ndarray, np.ndarray]:
    """For each (ascending) key u of an anomalous score: normal pixels with key < u and key <= u. Exact.

    Keys between the lowest and highest u fall into at most ~n/8 equal-width buckets. A bucket that
    holds no u compares with every u by bucket index alone; the normal pixels of buckets that do are
    sorted. Anomalous pixels always sit in such buckets, so they never enter the counts.
    """
    uint = _key_types(scores.dtype)[0]
    lo, hi = int(unique_keys[0]), int(unique_keys[-1])
    bucket_bits = min(_MAX_BUCKET_BITS, max(8, scores.size.bit_length() - 3))  # ~1/8 as many buckets as pixels
    shift = max(0, (hi - lo).bit_length() - bucket_bits)
    n_buckets = ((hi - lo) >> shift) + 1  # one more bucket, n_buckets, collects everything out of range
    unique_offsets = unique_keys - uint(lo)
    unique_buckets = (unique_offsets >> uint(shift)).astype(np.intp)
    occupied = np.zeros(n_buckets + 1, dtype=bool)
    occupied[unique_buckets] = True
    hist = np.zeros(n_buckets + 1, dtype=np.int32 if scores.size < 2**31 else np.int64)
    one = hist.dtype.type(1)  # a Python int would send np.add.at down its slow casting path
    size = min(_CHUNK, scores.size)
    keys, buckets, flags = np.empty(size, uint), np.empty(size, np.int64), np.empty(size, bool)
    n_below, mixed = 0, []
    for start in range(0, scores.size, size):
        values = scores[start : start + size]
        k, b, f = keys[: values.size], buckets[: values.size], flags[: values.size]
        src = _float_keys(values, signed, out=k) if signed else values.view(uint)
        if not signed and np.isnan(values, out=f).any():
            raise ValueError("scores: contain NaN")
        n_below += int(np.count_nonzero(np.less(src, uint(lo), out=f)))
        np.subtract(src, uint(lo), out=k)  # offsets; keys below lo wrap around and are redirected next
        unsigned = b.view(np.uint64)  # bucket arithmetic stays unsigned: 64-bit offsets may exceed 2**63
        np.right_shift(k, uint(shift), out=unsigned)
        np.minimum(unsigned, np.uint64(n_buckets), out=unsigned)
        np.copyto(b, n_buckets, where=f)
        np.add.at(hist, b, one)  # in place: a fresh bincount array per chunk costs page faults
        np.take(occupied, b, out=f)
        mixed.append(k[np.greater(f, anomalous[start : start + size], out=f)])
    hist[occupied] = 0  # keep the free buckets only; then free pixels in buckets below each u, in place:
    np.cumsum(hist, out=hist)  # totals never exceed the pixel count, which fits hist's dtype
    before = n_below + np.where(unique_buckets > 0, hist[unique_buckets - 1], 0).astype(np.int64)
    mixed_sorted = np.sort(np.concatenate(mixed))
    less = before + np.searchsorted(mixed_sorted, unique_offsets, side="left")
    leq = before + np.searchsorted(mixed_sorted, unique_offsets, side="right")
    return less, leq


def _rank(scores: np.ndarray, anomalous: np.ndarray, weights: np.ndarray | None = None) -> _Curve:
    """Curve data of flat `scores` with flat bool `anomalous` (both classes present).

    `weights`: one per anomalous pixel, in index order (PRO weights); None weighs each pixel 1.
    """
    positive_scores = scores[anomalous]
    n_pos, n_neg = positive_scores.size, scores.size - positive_scores.size
    signed = _has_sign_bits(scores)
    unique_keys, inverse, counts = np.unique(
        _float_keys(positive_scores, signed), return_inverse=True, return_counts=True
    )
    weight = counts if weights is None else np.bincount(inverse, weights=weights, minlength=unique_keys.size)
    neg_less, neg_leq = _count_normals_below(scores, anomalous, unique_keys, signed)
    representative = np.empty(unique_keys.size, dtype=np.intp)
    representative[inverse] = np.arange(n_pos)
    descending = slice(None, None, -1)
    return _Curve(
        values=positive_scores[representative][descending],
        pos_count=counts[descending],
        neg_ge=(n_neg - neg_less)[descending],
        neg_gt=(n_neg - neg_leq)[descending],
        weight=np.asarray(weight, dtype=np.float64)[descending],
        n_pos=n_pos,
        n_neg=n_neg,
    )


def _auroc(c: _Curve) -> float:
    # Mann-Whitney U with ties counted half == trapezoidal area under the exact ROC curve.
    below = (c.n_neg - c.neg_ge) + 0.5 * (c.neg_ge - c.neg_gt)
    return float(np.dot(c.pos_count, below) / (c.n_pos * c.n_neg))


def _average_precision(c: _Curve) -> float:
    # scikit-learn's step-wise AP: sum of precision * recall increase; recall only rises at anomalous scores.
    tps = np.cumsum(c.pos_count)
    return float(np.sum(c.pos_count * (tps / (tps + c.neg_ge))) / c.n_pos)


def _f1_max(c: _Curve) -> tuple[float, float]:
    # F1 = 2 TP / (TP + FP + P); adding only normal pixels never raises it, so anomalous scores suffice.
    f1 = 2.0 * np.cumsum(c.pos_count) / (np.cumsum(c.pos_count) + c.neg_ge + c.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(c.values[best])


def _aupro(c: _Curve, fpr_limit: float) -> float:
    """Trapezoidal area under the (FPR, PRO) polyline up to `fpr_limit`, divided by `fpr_limit`.

    At each distinct anomalous score v the curve steps from (FPR(>v), PRO(>v)) to (FPR(>=v), PRO(>=v));
    between anomalous scores only FPR grows (flat PRO). The points the MVTec AD code adds on those flat
    stretches are collinear, so the areas and the interpolation at the limit are the same.
    """
    pro_ge = np.cumsum(c.weight)
    x = np.concatenate(([0.0], np.column_stack((c.neg_gt, c.neg_ge)).ravel() / c.n_neg, [1.0]))
    y = np.concatenate(([0.0], np.column_stack((pro_ge - c.weight, pro_ge)).ravel(), [1.0]))
    y = np.minimum(y, 1.0)  # rounding of the weight sums must not push PRO above 1
    end = int(np.searchsorted(x, fpr_limit, side="right"))  # points 0..end-1 lie at or left of the limit
    area = float(np.sum(0.5 * (y[1:end] + y[: end - 1]) * np.diff(x[:end])))
    if end < x.size and x[end - 1] < fpr_limit:
        y_limit = y[end - 1] + (y[end] - y[end - 1]) * (fpr_limit - x[end - 1]) / (x[end] - x[end - 1])
        area += 0.5 * (y[end - 1] + y_limit) * (fpr_limit - x[end - 1])
    return float(area / fpr_limit)


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks/maps: expected equal shapes (N, H, W), got {masks.shape} and {maps.shape}")
    return masks.astype(bool, copy=False), maps


def _pro_weights(masks: np.ndarray, positive_index: np.ndarray) -> np.ndarray:
    """1 / (size of its region) / (number of regions) for each anomalous pixel."""
    region_of_pixel, n_regions = _region_of_pixels(masks, positive_index)
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return 1.0 / (sizes[region_of_pixel].astype(np.float64) * n_regions)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD's AU-PRO).

    Regions: 8-connected components (full 3x3 structure, scipy.ndimage.label) of each image's
    ground-truth mask, as in the MVTec AD evaluation code and anomalib. At every distinct score
    threshold: FPR = normal pixels at or above it / all normal pixels; PRO = mean over regions of the
    fraction of the region at or above it. Equal scores form one point; the curve starts at (0, 0);
    its trapezoidal area up to `fpr_limit` (interpolated linearly at the limit) is divided by
    `fpr_limit`, so a perfect map scores 1.0. Exact: no threshold grid, no min-max rescaling.
    Returns nan when there is no anomalous pixel (or no normal pixel): the curve is undefined.
    """
    masks, maps = _check_pixels(masks, maps)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit: must lie in (0, 1], got {fpr_limit}")
    scores = _as_scores(maps, "maps")
    anomalous = masks.ravel()
    if not anomalous.any() or anomalous.all():
        return float("nan")
    return _aupro(_rank(scores, anomalous, _pro_weights(masks, np.flatnonzero(anomalous))), fpr_limit)


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> dict[str, float]:
    """pixel_AUROC, pixel_AP (scikit-learn's definitions), pixel_F1Max and pixel_AUPRO over all pixels.

    One pass over the pixels serves all four. Each is nan when the masks hold only one class.
    Hand-written rather than scikit-learn / anomalib because it is measured faster on MVTec AD's test
    set size: 4.4 s for all four against 82 s (scikit-learn's AUROC alone) and 64 s (anomalib's AUPRO),
    with equal values (BENCHMARKS.md, `python -m d2dprompt.bench.metrics`).
    """
    masks, maps = _check_pixels(masks, maps)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit: must lie in (0, 1], got {fpr_limit}")
    scores = _as_scores(maps, "maps")
    anomalous = masks.ravel()
    keys = ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO")
    if not anomalous.any() or anomalous.all():
        return dict.fromkeys(keys, float("nan"))
    curve = _rank(scores, anomalous, _pro_weights(masks, np.flatnonzero(anomalous)))
    values = (_auroc(curve), _average_precision(curve), _f1_max(curve)[0], _aupro(curve, fpr_limit))
    return dict(zip(keys, values))


@dataclass(frozen=True)
class PixelCurves:
    """ROC and PR curves pooled over every pixel given, with their areas (what evaluate's plots show)."""

    fpr: np.ndarray  # ROC polyline from (0, 0) to (1, 1): before and after each distinct anomalous score's ties
    tpr: np.ndarray
    recall: np.ndarray  # PR points from (0, 1), one per distinct anomalous score, recall ascending
    precision: np.ndarray
    auroc: float  # pixel_AUROC of the pooled pixels: the trapezoidal area under (fpr, tpr)
    ap: float  # pixel_AP of the pooled pixels (scikit-learn's step-wise sum over the PR points)
    prevalence: float  # anomalous share of the pixels: the PR plot's chance line


def pixel_curves(masks: np.ndarray, maps: np.ndarray) -> PixelCurves | None:
    """Exact pooled pixel curves in pixel_metrics' memory: only the anomalous pixels are sorted, never all of them
    (scikit-learn's roc_curve over MVTec AD's 113 M test pixels needs several GB); None when one class is missing."""
    masks, maps = _check_pixels(masks, maps)
    scores, anomalous = _as_scores(maps, "maps"), masks.ravel()
    if not anomalous.any() or anomalous.all():
        return None
    c = _rank(scores, anomalous)
    tp = np.cumsum(c.pos_count)
    fpr = np.concatenate([[0.0], np.column_stack([c.neg_gt, c.neg_ge]).ravel() / c.n_neg, [1.0]])
    tpr = np.concatenate([[0.0], np.column_stack([tp - c.pos_count, tp]).ravel() / c.n_pos, [1.0]])
    recall, precision = np.concatenate([[0.0], tp / c.n_pos]), np.concatenate([[1.0], tp / (tp + c.neg_ge)])
    return PixelCurves(fpr, tpr, recall, precision, _auroc(c), _average_precision(c), c.n_pos / (c.n_pos + c.n_neg))


def _binary_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = _as_scores(scores, "scores")
    if labels.size != scores.size:
        raise ValueError(f"labels/scores: sizes differ ({labels.size} vs {scores.size})")
    if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels: must be 0/1 (or boolean)")
    return labels.astype(bool), scores


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1, threshold) over all thresholds, predicting anomalous when score >= threshold.

    Among equally good thresholds the highest is returned. (nan, nan) when labels hold one class.
    Works on any number of samples (image scores or flattened pixels) without a full sort.
    """
    labels, scores = _binary_inputs(labels, scores)
    if not labels.any() or labels.all():
        return float("nan"), float("nan")
    return _f1_max(_rank(scores, labels))


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """image_AUROC and image_AP (scikit-learn) and image_F1Max; nan when labels hold one class."""
    labels, scores = _binary_inputs(labels, scores)
    if labels.all() or not labels.any():
        return dict.fromkeys(("image_AUROC", "image_AP", "image_F1Max"), float("nan"))
    return {
        "image_AUROC": float(roc_auc_score(labels, scores)),
        "image_AP": float(average_precision_score(labels, scores)),
        "image_F1Max": f1_max_threshold(labels, scores)[0],
    }


def summarize(per_category: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Copy of `per_category` plus "mean": per metric, the mean over categories that have a value.

    The field reports the unweighted mean over categories; a category whose metric is nan (undefined:
    a category without anomalous test images has no AUROC, AP, AUPRO, F1Max or F1) is left out of
    that metric's mean, and `mean_coverage` says how many categories each mean covers.
    """
    if "mean" in per_category:
        raise ValueError("per_category: 'mean' is reserved for the summary")
    names = sorted({name for metrics in per_category.values() for name in metrics})
    mean = {}
    for name in names:
        values = np.array([m[name] for m in per_category.values() if name in m], dtype=np.float64)
        finite = values[~np.isnan(values)]
        mean[name] = float(finite.mean()) if finite.size else float("nan")
    return {**{cat: dict(m) for cat, m in per_category.items()}, "mean": mean}


def mean_coverage(summary: dict[str, dict[str, float]]) -> dict[str, dict]:
    """What each mean of `summarize` stands on: {"mean_over": {metric: categories averaged},
    "undefined": {metric: [categories where it is nan]}} (metrics defined everywhere are not listed).
    """
    categories = {cat: m for cat, m in summary.items() if cat != "mean"}
    mean_over, undefined = {}, {}
    for name in summary["mean"]:
        missing = [cat for cat, m in categories.items() if name not in m or np.isnan(m[name])]
        mean_over[name] = len(categories) - len(missing)
        if missing:
            undefined[name] = missing
    return {"mean_over": mean_over, "undefined": undefined}
