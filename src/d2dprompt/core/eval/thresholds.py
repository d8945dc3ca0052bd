"""From anomaly map to decision (DRAEM-style), pure numpy/scipy: thresholds, binary masks, labels, F1.

Convention everywhere: a pixel or image is predicted anomalous when its score >= the threshold.
Thresholds are fitted on a validation split and then applied unchanged to the test split; fitting
them on the test split inflates every number computed with them, so `Thresholds.source` records
where they came from and travels with the results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from d2dprompt.core.eval.metrics import f1_max_threshold, label_regions


@dataclass(frozen=True)
class Thresholds:
    image: float  # image predicted anomalous when its score >= image
    pixel: float  # pixel predicted anomalous when its map value >= pixel
    source: str  # how and on what they were fitted, e.g. "f1-max on validation" or "fixed"


def fit_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises F1 on the given (validation) data; the highest one if several do.

    `labels`/`scores` are image labels (N,) with image scores (N,), or masks (N, H, W) with maps
    (N, H, W) for a pixel threshold. Raises ValueError when the data hold only one class.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape:
        raise ValueError(f"labels/scores: shapes differ ({labels.shape} vs {scores.shape})")
    f1, threshold = f1_max_threshold(labels, scores)
    if np.isnan(f1):
        raise ValueError("labels: fitting an F1 threshold needs both normal and anomalous samples")
    return threshold


def sensitivity_threshold(normal_scores: np.ndarray, max_fpr: float) -> float:
    """Lowest threshold that flags at most `max_fpr` of the given normal (validation) scores.

    Needs no anomalous samples: the false-positive rate on normal data is what it bounds.
    """
    scores = np.asarray(normal_scores).ravel()
    if scores.size == 0:
        raise ValueError("normal_scores: empty")
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr: must lie in [0, 1], got {max_fpr}")
    allowed = int(np.floor(max_fpr * scores.size))
    if allowed >= scores.size:
        return float(scores.min())
    # the (allowed+1)-th highest score must stay below the threshold: step just above it, in its own dtype
    kth_highest = np.partition(scores, scores.size - allowed - 1)[scores.size - allowed - 1]
    dtype = scores.dtype if scores.dtype.kind == "f" else np.float64
    return float(np.nextafter(dtype.type(kth_highest), dtype.type(np.inf)))


PIXEL_GRID = 48  # coarse candidates for the post-processed pixel threshold, dense in the upper tail
PIXEL_REFINE = 16  # then this many between the best candidate's neighbours
QUANTILE_SAMPLE = 1_000_000  # pixel values the candidate quantiles are read from (a strided subset)


def fit_pixel_threshold(masks: np.ndarray, maps: np.ndarray, opening_kernel: int, min_area: int) -> float:
    """The pixel threshold whose *post-processed* masks (binary_masks: opening, min-area) maximise F1.

    Design choice: the threshold is fitted on what it is applied to. Opening and min-area make F1 a
    non-monotone function of the threshold, so it is searched on a grid (PIXEL_GRID quantiles of the
    map values, geometrically dense towards the top where defects lie, plus the raw F1-max threshold),
    then refined between the best candidate's neighbours (PIXEL_REFINE points). Without opening and
    min-area the post-processing is the identity and the exact raw F1-max threshold is returned.
    """
    raw = fit_f1_threshold(masks, maps)
    if opening_kernel <= 1 and min_area <= 1:
        return raw
    values = np.asarray(maps, dtype=np.float64).ravel()
    values = values[:: max(1, values.size // QUANTILE_SAMPLE)]
    tail = np.geomspace(0.5, 1.0 / values.size, PIXEL_GRID)
    candidates = np.unique(np.append(np.quantile(values, 1.0 - tail), raw))

    def f1(threshold: float) -> float:
        value = f1_at(masks, binary_masks(maps, threshold, opening_kernel, min_area))
        return -1.0 if np.isnan(value) else value

    scores = [f1(t) for t in candidates]
    best = int(np.argmax(scores))
    low, high = candidates[max(best - 1, 0)], candidates[min(best + 1, len(candidates) - 1)]
    fine = np.linspace(low, high, PIXEL_REFINE)
    fine_scores = [f1(t) for t in fine]
    if max(fine_scores) > scores[best]:
        return float(fine[int(np.argmax(fine_scores))])
    return float(candidates[best])


def fit_thresholds(
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    source: str,
    opening_kernel: int,
    min_area: int,
) -> Thresholds:
    """F1-adaptive image and pixel thresholds from one validation split; `source` names that split.

    The pixel threshold is fitted on the masks as `binary_masks` will make them with the same
    `opening_kernel` and `min_area`.
    """
    return Thresholds(
        image=fit_f1_threshold(image_labels, image_scores),
        pixel=fit_pixel_threshold(masks, maps, opening_kernel, min_area),
        source=source,
    )


def binary_masks(maps: np.ndarray, threshold: float, opening_kernel: int = 0, min_area: int = 0) -> np.ndarray:
    """Predicted masks (N, H, W) bool: maps >= threshold, opened, without regions below `min_area`.

    opening_kernel: side of the square structuring element of a binary opening, which removes specks
    and lines thinner than it (0 or 1: no opening). min_area: 8-connected regions with fewer pixels
    are dropped (0 or 1: keep all). Works on the whole stack at once; images never touch each other.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps: expected shape (N, H, W), got {maps.shape}")
    if opening_kernel < 0 or min_area < 0:
        raise ValueError(f"opening_kernel/min_area: must be >= 0, got {opening_kernel}/{min_area}")
    masks = maps >= threshold
    if opening_kernel > 1:
        structure = np.ones((1, opening_kernel, opening_kernel), dtype=bool)
        masks = ndimage.binary_opening(masks, structure=structure)
    if min_area > 1 and masks.any():
        labels, _ = label_regions(masks)
        keep = np.bincount(labels.ravel()) >= min_area
        keep[0] = False
        masks = keep[labels]
    return masks


def image_labels_from(values: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Predicted image labels (N,) bool.

    From predicted masks (N, H, W) bool: an image is anomalous when any pixel is left (pass no
    threshold). From image scores (N,): score >= `threshold`.
    """
    values = np.asarray(values)
    if values.ndim == 3:
        if values.dtype != bool or threshold is not None:
            raise ValueError("values: (N, H, W) input must be boolean masks, without a threshold")
        return values.any(axis=(1, 2))
    if values.ndim == 1:
        if threshold is None:
            raise ValueError("threshold: required to turn image scores into labels")
        return values >= threshold
    raise ValueError(f"values: expected masks (N, H, W) or scores (N,), got shape {values.shape}")


def f1_at(labels: np.ndarray, predictions: np.ndarray) -> float:
    """F1 of binary predictions (any shape: image labels or pixel masks).

    nan (undefined) when `labels` hold no anomalous sample, whatever was predicted: recall is 0/0
    then, and a 0.0 would drag a mean over categories down for a category that cannot score. This
    matches metrics.f1_max_threshold, which is nan without anomalous samples too.
    """
    labels, predictions = np.asarray(labels, dtype=bool), np.asarray(predictions, dtype=bool)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels/predictions: shapes differ ({labels.shape} vs {predictions.shape})")
    if not labels.any():
        return float("nan")
    tp = int(np.count_nonzero(labels & predictions))
    errors = int(np.count_nonzero(labels ^ predictions))
    return 2 * tp / (2 * tp + errors)
