"""Per-IMage Overlap curves (PIMO) and their normalised area AUPIMO (Bertoldo et al., BMVC 2024), pure numpy.

Same definitions, grid and integration as the authors' reference code (github.com/jpcbertoldo/aupimo,
`pimo_numpy.aupimo_scores`) and its port `anomalib.metrics.pimo.functional.aupimo_scores` (2.7.0; the
port's float32 torch.linspace rounds a few thresholds differently: 3e-7 apart at MVTec size):
- image classes come from the masks: an image is normal when its mask is all zero;
- K thresholds, linearly spaced between the min and max score of the NORMAL images, in the maps' dtype;
  a pixel is predicted anomalous when its score >= threshold;
- shared FPR(t) = mean over normal images of each image's FPR(t) (all images have H*W pixels, so this is
  also the fraction of all normal-image pixels >= t);
- per anomalous image i, TPR_i(t) = fraction of its anomalous pixels >= t (its normal pixels are unused);
- the integration range runs between the thresholds whose shared FPR is nearest to each bound (the first
  such threshold on ties, as numpy/torch argmin); points with shared FPR 0 are dropped;
- AUPIMO_i = trapezoidal area under TPR_i against log(shared FPR) over that range, divided by
  log(upper / lower) and clipped to [0, 1]; nan for normal images.
The reference fails when the range holds 30 points or fewer (unless forced); so does this module.
Counting is done once per pixel against the grid (bin index by arithmetic, then exact fix-up), so K does
not multiply the work per pixel: an MVTec-size category takes well under a second.
WeightedAUPIMO gives the mean AUPIMO of resampled test sets (image multiplicities) for the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_THRESHOLDS = 300_000  # the reference's default K; 10x finer moved AUPIMO by ~1e-4 at MVTec size (synthetic)
FPR_BOUNDS = (1e-5, 1e-4)  # the paper's integration range of the shared FPR
_MIN_POINTS = 30  # the reference refuses to integrate over this many points or fewer (unless forced)
_CHUNK = 1 << 22  # pixels binned per step: float64 scratch stays at ~32 MiB whatever the data size
_FIXUP_ROUNDS = 4  # arithmetic bin guesses are off by at most a rounding step; leftovers use searchsorted
_REACH = 2.0  # WeightedAUPIMO keeps each normal image's top floor(2 * upper * H * W) + 1 pixels (see there)
_SCRATCH = 1 << 20  # (replicas x steps) float64 entries per WeightedAUPIMO step: 8 MiB per scratch array


@dataclass(frozen=True)
class PIMOCurves:
    """Shared thresholds with the shared FPR and per-image TPR at each of them."""

    thresholds: np.ndarray  # (K,) ascending, in the maps' dtype
    shared_fpr: np.ndarray  # (K,) float64, non-increasing
    per_image_tpr: np.ndarray  # (N, K) float64, non-increasing along K; nan rows for normal images
    image_classes: np.ndarray  # (N,) int32: 1 where the mask has an anomalous pixel


@dataclass(frozen=True)
class AUPIMOResult:
    """Per-image AUPIMO and what the integration stood on."""

    per_image: np.ndarray  # (N,) float64 in [0, 1]; nan for normal images
    mean: float  # mean over anomalous images (anomalib's `return_average=True` value)
    fpr_bounds: tuple[float, float]  # the requested (lower, upper) shared FPR
    fpr_bounds_achieved: tuple[float, float]  # the shared FPR at the thresholds chosen for them
    thresh_bounds: tuple[float, float]  # (threshold at the upper FPR, threshold at the lower FPR)
    num_points: int  # grid points inside the range (the reference's num_thresholds_auc; it warns below 300)
    image_classes: np.ndarray  # (N,) int32


class AUPIMOUndefined(ValueError):
    """AUPIMO cannot be computed on these maps (the normal scores give no range, or the FPR bounds lie out of the
    curve's reach): a property of the data, reported as n/a with this reason; other ValueErrors are bad inputs."""


def check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (N, H, W) masks and finite maps (float32/float64 kept, other real dtypes as float64); else ValueError."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks/maps: expected equal shapes (N, H, W), got {masks.shape} and {maps.shape}")
    if maps.dtype.kind not in "fiub":
        raise ValueError(f"maps: expected real-valued scores, got dtype {maps.dtype}")
    if masks.dtype != bool:
        if masks.dtype.kind not in "fiub" or not np.isin(masks, (0, 1)).all():
            raise ValueError("masks: must be binary (0/1 or boolean)")
        masks = masks.astype(bool)
    # float32 maps keep float32 thresholds, as the reference's np.linspace(..., dtype=maps.dtype) does
    maps = maps if maps.dtype in (np.float32, np.float64) else maps.astype(np.float64)
    if not np.isfinite(maps).all():
        raise ValueError("maps: contain NaN or inf")
    return masks, maps


def _check_bounds(fpr_bounds: tuple[float, float]) -> tuple[float, float]:
    if len(fpr_bounds) != 2 or not 0.0 < fpr_bounds[0] < fpr_bounds[1] <= 1.0:
        raise ValueError(f"fpr_bounds: expected (lower, upper) with 0 < lower < upper <= 1, got {fpr_bounds}")
    return float(fpr_bounds[0]), float(fpr_bounds[1])


def shared_thresholds(normal_maps: np.ndarray, num_thresholds: int) -> np.ndarray:
    """The reference's grid: `num_thresholds` values linearly spaced over the normal images' score range."""
    if int(num_thresholds) != num_thresholds or num_thresholds < 2:
        raise ValueError(f"num_thresholds: expected an integer >= 2, got {num_thresholds}")
    lo, hi = float(normal_maps.min()), float(normal_maps.max())
    if not lo < hi:
        raise AUPIMOUndefined(f"maps: the normal images' scores are all equal ({lo}); PIMO needs a score range")
    return np.linspace(lo, hi, int(num_thresholds), dtype=normal_maps.dtype)


def threshold_bins(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many thresholds are <= each value (np.searchsorted(thresholds, values, "right")), as int64.

    A value is then >= threshold k exactly when its bin is > k. Fast for a linspace grid: the bin is
    guessed from the spacing and corrected against the actual thresholds (exact whatever their rounding).
    """
    values = np.asarray(values).ravel()
    k = thresholds.size
    out = np.empty(values.size, dtype=np.int64)
    lo, hi = float(thresholds[0]), float(thresholds[-1])
    scale = (k - 1) / (hi - lo) if hi > lo else 0.0
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK]
        guess = np.floor((chunk.astype(np.float64) - lo) * scale)
        bins = np.clip(guess, -1, k - 1).astype(np.int64) + 1
        todo = np.arange(chunk.size)
        for _ in range(_FIXUP_ROUNDS):
            v, b = chunk[todo], bins[todo]
            high = (b > 0) & (thresholds[np.maximum(b - 1, 0)] > v)  # a counted threshold lies above v
            low = (b < k) & (thresholds[np.minimum(b, k - 1)] <= v)  # an uncounted one lies at or below v
            bins[todo] = b - high + low
            todo = todo[high | low]
            if todo.size == 0:
                break
        if todo.size:
            bins[todo] = np.searchsorted(thresholds, chunk[todo], side="right")
        out[start : start + chunk.size] = bins
    return out


def _shared_fpr(normal_maps: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Fraction of normal-image pixels >= each threshold (== the mean of the per-image FPRs)."""
    hist = np.bincount(threshold_bins(normal_maps, thresholds), minlength=thresholds.size + 1)
    below = np.cumsum(hist)[: thresholds.size]  # pixels with bin <= k, i.e. score < threshold k
    return (normal_maps.size - below) / normal_maps.size


def _tpr(anomalous_maps: np.ndarray, anomalous_masks: np.ndarray, thresholds: np.ndarray, first: int, last: int):
    """(images, last - first + 1) TPR of each anomalous image at thresholds first..last."""
    n_images, width = len(anomalous_maps), last - first + 1
    image = np.repeat(np.arange(n_images), anomalous_masks.reshape(n_images, -1).sum(axis=1))
    # bins outside [first, last + 1] count like the ends: all below / all at or above the range
    bins = np.clip(threshold_bins(anomalous_maps[anomalous_masks], thresholds), first, last + 1) - first
    counts = np.bincount(image * (width + 1) + bins, minlength=n_images * (width + 1)).reshape(n_images, width + 1)
    below = np.cumsum(counts, axis=1)[:, :width]
    positives = counts.sum(axis=1, keepdims=True)
    return (positives - below) / positives


def _classes(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(len(masks), -1).any(axis=1)


def pimo_curves(masks: np.ndarray, maps: np.ndarray, num_thresholds: int = NUM_THRESHOLDS) -> PIMOCurves:
    """PIMO curves of (N, H, W) binary `masks` and score `maps` (see the module docstring).

    Needs at least one normal image (its scores define the thresholds). The (N, K) TPR matrix is
    float64, as in the reference: 240 MB for 100 images at the default K; `aupimo` never builds it.
    """
    masks, maps = check_pixels(masks, maps)
    anomalous = _classes(masks)
    if anomalous.all():
        raise ValueError("masks: PIMO needs at least one normal image (an all-zero mask)")
    thresholds = shared_thresholds(maps[~anomalous], num_thresholds)
    per_image_tpr = np.full((len(maps), thresholds.size), np.nan)
    if anomalous.any():
        per_image_tpr[anomalous] = _tpr(maps[anomalous], masks[anomalous], thresholds, 0, thresholds.size - 1)
    return PIMOCurves(thresholds, _shared_fpr(maps[~anomalous], thresholds), per_image_tpr, anomalous.astype(np.int32))


def index_at_fpr(shared_fpr: np.ndarray, level: float) -> int:
    """Index of the threshold whose shared FPR is nearest `level` (reference: `thresh_at_shared_fpr_level`).

    Ties go to the first (lowest) threshold, except level 1, which takes the highest threshold at FPR 1.
    """
    low, high = float(shared_fpr.min()), float(shared_fpr.max())
    if not low <= level <= high:
        raise AUPIMOUndefined(
            f"fpr_bounds: shared FPR {level:g} is out of reach, the curve spans [{low:g}, {high:g}] "
            f"(too few normal pixels for so low an FPR?)"
        )
    if level == 1.0:
        return int(np.flatnonzero(shared_fpr == 1.0).max())
    return int(np.argmin(np.abs(shared_fpr - level)))


def _undefined(n_images: int, anomalous: np.ndarray, fpr_bounds: tuple[float, float]) -> AUPIMOResult:
    nan = float("nan")
    return AUPIMOResult(np.full(n_images, nan), nan, fpr_bounds, (nan, nan), (nan, nan), 0, anomalous.astype(np.int32))


def aupimo(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_bounds: tuple[float, float] = FPR_BOUNDS,
    num_thresholds: int = NUM_THRESHOLDS,
    force: bool = False,
) -> AUPIMOResult:
    """AUPIMO of each image of (N, H, W) binary `masks` and score `maps`, and their mean over anomalous images.

    Equal to the authors' `aupimo_scores` to floating-point rounding, and to anomalib 2.7.0's for float64 maps.
    Undefined (all nan, as metrics.py does) without a normal image or without an anomalous image.
    AUPIMOUndefined (a ValueError) when the normal scores are all equal, a bound lies out of the shared FPR's reach,
    both bounds pick the same threshold, or the range holds <= 30 grid points (unless `force`): more thresholds or
    more normal pixels help. Other ValueErrors mean malformed inputs.
    """
    masks, maps = check_pixels(masks, maps)
    fpr_bounds = _check_bounds(fpr_bounds)
    anomalous = _classes(masks)
    if anomalous.all() or not anomalous.any():
        return _undefined(len(maps), anomalous, fpr_bounds)
    thresholds = shared_thresholds(maps[~anomalous], num_thresholds)
    shared_fpr = _shared_fpr(maps[~anomalous], thresholds)
    lower, upper = fpr_bounds
    first, last = index_at_fpr(shared_fpr, upper), index_at_fpr(shared_fpr, lower)  # thresholds ascend
    if first >= last:
        raise AUPIMOUndefined(
            f"fpr_bounds: both bounds {fpr_bounds} fall on threshold {first} of {thresholds.size}; raise num_thresholds"
        )
    with np.errstate(divide="ignore"):
        log_fpr = np.log(shared_fpr[first : last + 1])
    keep = np.isfinite(log_fpr)  # shared FPR 0 (above every normal score) has no log: dropped, as in the reference
    if not keep.any() or (keep.sum() <= _MIN_POINTS and not force):
        raise AUPIMOUndefined(
            f"fpr_bounds: only {int(keep.sum())} thresholds fall inside {fpr_bounds} (the reference needs > "
            f"{_MIN_POINTS}); raise num_thresholds or pass force=True"
        )
    x = log_fpr[keep][::-1]  # ascending FPR, as the reference integrates
    y = _tpr(maps[anomalous], masks[anomalous], thresholds, first, last)[:, keep][:, ::-1]
    area = np.sum(np.diff(x) * (y[:, 1:] + y[:, :-1]) / 2, axis=1)
    per_image = np.full(len(maps), np.nan)
    # clipped as in the reference: a range achieved wider than the bounds can push a perfect image above 1
    per_image[anomalous] = np.clip(area / np.log(upper / lower), 0.0, 1.0)
    return AUPIMOResult(
        per_image=per_image,
        mean=float(per_image[anomalous].mean()),
        fpr_bounds=fpr_bounds,
        fpr_bounds_achieved=(float(shared_fpr[last]), float(shared_fpr[first])),
        thresh_bounds=(float(thresholds[first]), float(thresholds[last])),
        num_points=int(keep.sum()),
        image_classes=anomalous.astype(np.int32),
    )


def _nearest(plateaus: np.ndarray, level: float) -> np.ndarray:
    """Per row, the first plateau nearest `level` (level 1: the last at FPR 1), as index_at_fpr."""
    if level == 1.0:
        return plateaus.shape[1] - 1 - np.argmax((plateaus == 1.0)[:, ::-1], axis=1)
    distance = np.where(plateaus > 0, np.abs(plateaus - level), np.inf)  # FPR 0 has no log: never a bound
    return np.argmin(distance, axis=1)


class WeightedAUPIMO:
    """Mean AUPIMO of the test set with image i counted w_i times, for many w at once (bootstrap replicas).

    Calling it with a (B, N) array of image multiplicities gives B means (nan where undefined: no normal
    or no anomalous image drawn, bound out of reach, both bounds on one threshold). It uses the grid of
    the exact metric on the unweighted images (`exact`), so w = 1 gives `exact.mean` to rounding.

    A replica's shared FPR at grid threshold k is sum_j w_j FP_j(k) / (H W sum_j w_j) over the normal
    images j; its bounds are the plateaus of that step function nearest to each FPR bound, as in the
    exact metric. Let M = floor(2 upper H W) + 1 and c = the lowest, over normal images, of each
    image's M-th highest score. At thresholds <= c every normal image has >= M pixels at or above, so
    every replica's FPR there is >= M / (H W) > 2 upper: farther from both bounds than any plateau at
    or below `upper`, which always exists, so never picked. Only normal pixels from c's grid bin up are
    kept (typically a few per image) and every plateau from there on is exact.
    """

    def __init__(self, masks: np.ndarray, maps: np.ndarray, fpr_bounds=FPR_BOUNDS, num_thresholds=NUM_THRESHOLDS):
        self.exact = exact = aupimo(masks, maps, fpr_bounds, num_thresholds)  # fails as the metric does
        self.lower, self.upper = exact.fpr_bounds
        masks, maps = check_pixels(masks, maps)
        self.n_images, hw = len(maps), maps[0].size
        classes = exact.image_classes.astype(bool)
        self.normal_images, self.anomalous_images = np.flatnonzero(~classes), np.flatnonzero(classes)
        if np.isnan(exact.mean):
            return
        normal = maps[~classes].reshape(-1, hw)
        thresholds = shared_thresholds(normal, num_thresholds)
        k = thresholds.size
        keep = int(_REACH * self.upper * hw) + 1
        floor = thresholds[0]
        if keep <= hw:
            cut = np.partition(normal, hw - keep, axis=1)[:, hw - keep].min()
            floor = thresholds[threshold_bins(np.array([cut], normal.dtype), thresholds)[0] - 1]
        image, pixel = np.nonzero(normal >= floor)
        bins = np.minimum(threshold_bins(normal[image, pixel], thresholds), k)
        steps, column = np.unique(bins, return_inverse=True)
        counts = np.bincount(image * steps.size + column, minlength=len(normal) * steps.size)
        self.counts = counts.reshape(len(normal), steps.size).astype(np.float64)
        self.n_steps = int(np.count_nonzero(steps < k))  # pixels in bin k sit at the top threshold: no step
        self.steps = steps[: self.n_steps]
        self.mid_tpr = self._mid_tpr(maps[classes], masks[classes], thresholds)
        self.hw, self.log_range = hw, np.log(self.upper / self.lower)

    def _mid_tpr(self, maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        """(steps, anomalous images): mean of the TPR at the two thresholds around each step."""
        n_pos = masks.reshape(len(masks), -1).sum(axis=1)
        stride = thresholds.size + 2
        keys = np.repeat(np.arange(len(masks)) * stride, n_pos) + threshold_bins(maps[masks], thresholds)
        keys.sort()
        start = np.searchsorted(keys, np.arange(len(masks)) * stride)
        tprs = []
        for q in (self.steps - 1, self.steps):  # bins > q are the pixels >= threshold q
            below = np.searchsorted(keys, np.arange(len(masks))[None, :] * stride + q[:, None], side="right")
            tprs.append((n_pos - (below - start)) / n_pos)
        return (tprs[0] + tprs[1]) / 2

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if weights.ndim != 2 or weights.shape[1] != self.n_images or (weights < 0).any():
            raise ValueError(f"weights: expected (B, {self.n_images}) non-negative multiplicities, got {weights.shape}")
        if np.isnan(self.exact.mean):
            return np.full(len(weights), np.nan)
        rows = max(1, _SCRATCH // max(1, self.n_steps))  # many kept pixels: fewer replicas at a time
        return np.concatenate([self._means(weights[i : i + rows]) for i in range(0, len(weights), rows)])

    def _means(self, w: np.ndarray) -> np.ndarray:
        out = np.full(len(w), np.nan)
        wn, wa = w[:, self.normal_images], w[:, self.anomalous_images]
        per_step = wn @ self.counts
        after = per_step.sum(axis=1, keepdims=True) - np.cumsum(per_step, axis=1)  # normals above each step
        scale = self.hw * wn.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            fpr_after = (after / scale)[:, : self.n_steps]
            fpr_before = ((after + per_step) / scale)[:, : self.n_steps]
            plateaus = np.hstack((np.ones((len(w), 1)), fpr_after))  # plateau 0: the lowest threshold, FPR 1
            first, last = _nearest(plateaus, self.upper), _nearest(plateaus, self.lower)
            position = np.arange(1, self.n_steps + 1)[None, :]
            inside = (position > first[:, None]) & (position <= last[:, None])
            step = np.where(inside, np.log(fpr_before) - np.log(fpr_after), 0.0)
            per_image = np.clip(step @ self.mid_tpr / self.log_range, 0.0, 1.0)
            mean = (wa * per_image).sum(axis=1) / wa.sum(axis=1)
        reachable = np.where(plateaus > 0, plateaus, np.inf).min(axis=1) <= self.lower  # else the metric fails
        defined = reachable & (first < last) & (scale[:, 0] > 0) & (wa.sum(axis=1) > 0)
        out[defined] = mean[defined]
        return out
