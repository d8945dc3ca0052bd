"""What evaluate and compare add to each metric: AUPIMO per image, and bootstrap intervals per category and for
the mean over categories (pure numpy; bootstrap.py and pimo.py hold the statistics).

The mean's interval resamples every category at once (each with its own images, stratified by label as in
bootstrap.py): replica b of the mean is the mean over categories of their replicas b, so it says how much the
reported mean moves with the test images, not how much categories differ from each other.
"""

from __future__ import annotations

import numpy as np

from d2dprompt.core.eval.bootstrap import METRICS, difference_of, interval_of, metric_replicas
from d2dprompt.core.eval.pimo import AUPIMOUndefined, aupimo

LO, HI = "_lo", "_hi"  # suffixes of an interval's bounds beside its metric: pixel_AUPRO_lo, pixel_AUPRO_hi


def aupimo_per_image(masks: np.ndarray, maps: np.ndarray, fpr_bounds: tuple[float, float]) -> tuple[float, np.ndarray, str | None]:
    """(mean AUPIMO over anomalous images, per-image AUPIMO (nan for normal images), why it is undefined or None).

    Undefined (nan) without normal or anomalous images, or when the maps do not reach the FPR bounds (flat normal
    maps, too few normal pixels): the reason is returned instead of stopping the evaluation. Malformed inputs still
    raise."""
    try:
        result = aupimo(masks, maps, tuple(fpr_bounds))
    except AUPIMOUndefined as err:
        return float("nan"), np.full(len(maps), np.nan), str(err)
    return result.mean, result.per_image, None


def category_seed(seed: int, index: int) -> int:
    """Category `index`'s resampling seed: different categories draw independently, every method draws alike."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def replica_settings(ev) -> dict:
    """The evaluate params (EvaluateParams) a category's replicas depend on: compare pairs two methods' replicas only
    when they were drawn alike."""
    return {"resamples": ev.bootstrap, "seed": ev.bootstrap_seed, "aupro_fpr_limit": ev.aupro_fpr_limit, "aupimo_fpr": list(ev.aupimo_fpr)}


def replicas_of(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, *, n_resamples: int, seed: int,
                fpr_limit: float, fpr_bounds: tuple[float, float], with_aupimo: bool, with_pixels: bool = True) -> dict[str, np.ndarray]:
    """Bootstrap replicas of image_AUROC, pixel_AUROC, pixel_AUPRO (and AUPIMO when defined) of one category, of
    image_AUROC alone when it has no pixel truth (`with_pixels` False); {} when it has one class only."""
    if np.all(labels == labels[0]):
        return {}
    names = METRICS if with_aupimo else tuple(m for m in METRICS if m != "AUPIMO")
    if not with_pixels:
        names, masks, maps = ("image_AUROC",), None, None
    _, replicas = metric_replicas(labels, scores, masks, maps, n_resamples=n_resamples, seed=seed, fpr_limit=fpr_limit,
                                  pimo_bounds=tuple(fpr_bounds), metrics=names)
    return replicas


def defined_in(summary: dict[str, dict[str, float]], name: str) -> list[str]:
    """The categories of `summary` (not "mean") where `name` has a finite value."""
    return [c for c, m in summary.items() if c != "mean" and np.isfinite(m.get(name, np.nan))]


def mean_replicas(per_category: dict[str, dict[str, np.ndarray]], name: str, categories: list[str]) -> np.ndarray | None:
    """Replicas of the mean of `name` over exactly `categories` (those its exact mean averages): replica b is the
    mean of the categories' replicas b, and nan when one of them is, so that every replica averages the same
    categories as the exact value; None when a category has no replicas."""
    if not categories or any(name not in per_category.get(c, {}) for c in categories):
        return None
    return np.stack([per_category[c][name] for c in categories]).mean(axis=0)


def with_intervals(summary: dict[str, dict[str, float]], replicas: dict[str, dict[str, np.ndarray]], confidence: float) -> dict[str, dict[str, float]]:
    """`summary` (metrics.summarize: categories + "mean") with `<metric>_lo` / `<metric>_hi` after every metric that
    has replicas, for each category and for the mean."""
    out = {}
    for category, values in summary.items():
        row = {}
        for name, value in values.items():
            row[name] = value
            reps = mean_replicas(replicas, name, defined_in(summary, name)) if category == "mean" else replicas.get(category, {}).get(name)
            if reps is not None:
                interval = interval_of(value, reps, confidence)
                row[name + LO], row[name + HI] = interval.lo, interval.hi
        out[category] = row
    return out


def paired_differences(exact_a: dict[str, dict[str, float]], exact_b: dict[str, dict[str, float]],
                       reps_a: dict[str, dict[str, np.ndarray]], reps_b: dict[str, dict[str, np.ndarray]], confidence: float) -> dict[str, dict[str, dict]]:
    """{category or "mean": {metric: {diff, lo, hi, p_value}}} of method a minus method b, from both methods'
    summaries and replicas on the same images and seeds (so the replicas pair up).

    The mean's difference averages, for each metric, only the categories where it is defined for both methods (a
    category one method leaves undefined, such as AUPIMO on flat normal maps, would otherwise be in one mean and
    not the other): its exact value and every replica average the same categories, counted in `categories`."""
    out: dict[str, dict[str, dict]] = {}
    for category in exact_a:
        row = {}
        for name in METRICS:
            if category == "mean":
                both = [c for c in defined_in(exact_a, name) if c in set(defined_in(exact_b, name))]
                ra, rb = mean_replicas(reps_a, name, both), mean_replicas(reps_b, name, both)
                if ra is None or rb is None:
                    continue
                diff = float(np.mean([exact_a[c][name] - exact_b[c][name] for c in both]))
                d = difference_of(diff, ra - rb, confidence)
                row[name] = {"diff": d.diff, "lo": d.lo, "hi": d.hi, "p_value": d.p_value, "categories": len(both)}
                continue
            ra, rb = reps_a.get(category, {}).get(name), reps_b.get(category, {}).get(name)
            if ra is None or rb is None or name not in exact_a[category] or name not in exact_b[category]:
                continue
            d = difference_of(exact_a[category][name] - exact_b[category][name], ra - rb, confidence)
            row[name] = {"diff": d.diff, "lo": d.lo, "hi": d.hi, "p_value": d.p_value}
        out[category] = row
    return out
