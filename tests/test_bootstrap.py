"""Bootstrap intervals and paired comparisons: replica formulas against the exact metrics on resampled data."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from d2dprompt.core.eval import bootstrap
from d2dprompt.core.eval.bootstrap import (
    Difference,
    Interval,
    bootstrap_intervals,
    indistinguishable,
    paired_comparison,
    resample_weights,
    seed_difference,
    seed_mean,
)
from d2dprompt.core.eval.metrics import pixel_metrics
from d2dprompt.core.eval.pimo import aupimo

BOUNDS = (1e-3, 1e-2)  # AUPIMO bounds within reach of these small test sets (>= 1e4 normal pixels)
AUPRO_TOLERANCE = 2e-4  # the replica's threshold grid against the exact curve (see bootstrap._PRO_LINEAR)


def case(seed, n=14, n_anomalous=6, size=48, signal=2.0):
    """Discs plus scattered single pixels (many PRO regions) on the first images; noise elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n_anomalous):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(2, size // 4))]
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[i][rng.random((size, size)) < 0.003] = True
    maps = (rng.standard_normal((n, size, size)) + signal * masks).astype(np.float32)
    labels = masks.any(axis=(1, 2))
    scores = maps.reshape(n, -1).max(axis=1) + rng.standard_normal(n)  # imperfect image scores
    return labels, scores, masks, maps


def method(labels, scores, masks, maps, num_thresholds=bootstrap.NUM_THRESHOLDS):
    m = bootstrap._Method(labels, scores, masks, maps, bootstrap.METRICS, 0.3, BOUNDS)
    if num_thresholds != bootstrap.NUM_THRESHOLDS:
        m.parts[-1] = bootstrap._PimoStats(masks, maps, BOUNDS, num_thresholds)
    return m


def test_replicas_at_all_ones_equal_the_exact_metrics():
    labels, scores, masks, maps = case(0)
    m = method(labels, scores, masks, maps)
    ones = {name: values[0] for name, values in m.replicas(np.ones((1, len(labels)))).items()}
    exact = pixel_metrics(masks, maps, 0.3)
    assert ones["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)  # exact up to rounding
    assert ones["pixel_AUROC"] == pytest.approx(exact["pixel_AUROC"], abs=1e-12)
    assert ones["pixel_AUPRO"] == pytest.approx(exact["pixel_AUPRO"], abs=AUPRO_TOLERANCE)
    assert ones["AUPIMO"] == pytest.approx(aupimo(masks, maps, BOUNDS).mean, abs=1e-9)


def pimo_on_grid(masks, maps, thresholds, bounds):
    """Reference AUPIMO on a given grid, brute force; the grid is cut at the top normal score as the reference's is."""
    normal = ~masks.any(axis=(1, 2))
    thresholds = thresholds[thresholds <= maps[normal].max()]
    fprs = [(maps[i].ravel()[None, :] >= thresholds[:, None]).mean(axis=1) for i in np.flatnonzero(normal)]
    shared = np.mean(fprs, axis=0)
    first, last = (int(np.argmin(np.abs(shared - level))) for level in bounds[::-1])
    x, inside = np.log(shared[first : last + 1]), thresholds[first : last + 1, None]
    per_image = []
    for i in np.flatnonzero(~normal):
        y = (maps[i][masks[i]][None, :] >= inside).mean(axis=1)
        area = np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:]) / 2) / np.log(bounds[1] / bounds[0])
        per_image.append(np.clip(area, 0, 1))
    return float(np.mean(per_image))


def test_replicas_equal_the_exact_metrics_of_the_resampled_images():
    labels, scores, masks, maps = case(1)
    k = 3000  # a small AUPIMO grid keeps the brute force fast; the replica logic does not depend on K
    m = method(labels, scores, masks, maps, num_thresholds=k)
    thresholds = np.linspace(float(maps[~labels].min()), float(maps[~labels].max()), k, dtype=maps.dtype)
    weights = resample_weights(labels, 4, seed=7)
    replicas = m.replicas(weights)
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(len(labels)), w.astype(int))  # the resampled test set, images repeated
        exact = pixel_metrics(masks[idx], maps[idx], 0.3)
        assert replicas["image_AUROC"][b] == pytest.approx(roc_auc_score(labels[idx], scores[idx]), abs=1e-12)
        assert replicas["pixel_AUROC"][b] == pytest.approx(exact["pixel_AUROC"], abs=1e-12)
        assert replicas["pixel_AUPRO"][b] == pytest.approx(exact["pixel_AUPRO"], abs=AUPRO_TOLERANCE)
        assert replicas["AUPIMO"][b] == pytest.approx(pimo_on_grid(masks[idx], maps[idx], thresholds, BOUNDS), abs=1e-9)
        # and close to the metric recomputed from scratch, whose grid follows the replica's own score range
        assert replicas["AUPIMO"][b] == pytest.approx(aupimo(masks[idx], maps[idx], BOUNDS, k).mean, abs=2e-3)


def test_resampling_is_stratified_and_reproducible():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0], dtype=bool)
    w = resample_weights(labels, 50, seed=3)
    assert (w[:, ~labels].sum(axis=1) == 5).all() and (w[:, labels].sum(axis=1) == 3).all()
    np.testing.assert_array_equal(w, resample_weights(labels, 50, seed=3))
    assert not np.array_equal(w, resample_weights(labels, 50, seed=4))


def test_intervals_are_reproducible_and_contain_the_value():
    labels, scores, masks, maps = case(2)
    kwargs = dict(n_resamples=200, seed=11, pimo_bounds=BOUNDS)
    first = bootstrap_intervals(labels, scores, masks, maps, **kwargs)
    assert first == bootstrap_intervals(labels, scores, masks, maps, **kwargs)
    assert first != bootstrap_intervals(labels, scores, masks, maps, **{**kwargs, "seed": 12})
    assert list(first) == list(bootstrap.METRICS)
    for interval in first.values():
        assert interval.lo <= interval.value <= interval.hi and interval.lo < interval.hi
        assert interval.n_used == 200
    wider = bootstrap_intervals(labels, scores, masks, maps, **kwargs, confidence=0.99)
    assert all(wider[k].lo <= first[k].lo and first[k].hi <= wider[k].hi for k in first)


def test_a_metric_that_cannot_vary_has_zero_width():
    labels, scores, masks, maps = case(3, n=10, n_anomalous=4)
    hopeless = np.where(masks, -50.0, maps).astype(np.float32)  # every anomalous pixel below every normal one
    out = bootstrap_intervals(labels, -10.0 * labels, masks, hopeless, n_resamples=100, seed=0, pimo_bounds=BOUNDS)
    for name in bootstrap.METRICS:
        assert (out[name].lo, out[name].value, out[name].hi) == (0.0, 0.0, 0.0), name
    same = bootstrap_intervals(labels, np.ones(len(labels)), masks, np.ones_like(maps), n_resamples=100, seed=0,
                               metrics=("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))
    assert (same["image_AUROC"].lo, same["image_AUROC"].hi) == (0.5, 0.5)
    assert (same["pixel_AUROC"].lo, same["pixel_AUROC"].hi) == (0.5, 0.5)
    assert same["pixel_AUPRO"].value == pytest.approx(0.15)  # the diagonal up to FPR 0.3, over 0.3
    assert same["pixel_AUPRO"].lo == pytest.approx(0.15, abs=1e-12) == same["pixel_AUPRO"].hi
    perfect = np.where(masks, 50.0, maps).astype(np.float32)
    out = bootstrap_intervals(labels, labels * 10.0, masks, perfect, n_resamples=100, seed=0,
                              metrics=("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))
    for name, interval in out.items():  # AUROC exactly 1; AUPRO's trapezoid sums round (metrics.py's too)
        assert [interval.lo, interval.value, interval.hi] == pytest.approx([1.0] * 3, abs=1e-12), name


def test_identical_methods_have_p_one_and_a_perfect_method_beats_a_random_one():
    labels, scores, masks, maps = case(4)
    same = paired_comparison(labels, masks, (scores, maps), (scores.copy(), maps.copy()),
                             n_resamples=300, seed=0, pimo_bounds=BOUNDS)
    for d in same.values():
        assert (d.diff, d.lo, d.hi, d.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert indistinguishable(d)
    labels, scores, masks, maps = case(4, n=40, n_anomalous=16, size=32)
    rng = np.random.default_rng(0)
    perfect = (labels * 10.0, np.where(masks, 50.0, maps).astype(np.float32))
    random = (rng.standard_normal(len(labels)), rng.standard_normal(maps.shape).astype(np.float32))
    better = paired_comparison(labels, masks, perfect, random, n_resamples=1000, seed=0, pimo_bounds=BOUNDS)
    for name, d in better.items():
        assert d.p_value < 0.01 and d.lo > 0 and d.diff > 0, name
        assert d.p_value == pytest.approx(2 / 1001) and not indistinguishable(d)


def test_undefined_replicas_are_skipped_and_counted():
    labels, scores, masks, maps = case(5, n=12, n_anomalous=3)
    labels[3:5] = True  # two more anomalous images, without masks: some replicas draw no anomalous pixel
    out = bootstrap_intervals(labels, scores, masks, maps, n_resamples=400, seed=1, metrics=("pixel_AUROC",))
    # P(no masked image among 5 draws from 5 labelled-anomalous images with 3 masked) = (2/5)^5 ~ 1 %
    assert 380 < out["pixel_AUROC"].n_used < 400
    assert list(out) == ["pixel_AUROC"]


def test_only_normal_images_give_nan_pixel_metrics():
    labels, scores, masks, maps = case(6, n=6, n_anomalous=0)
    out = bootstrap_intervals(labels, scores, masks, maps, n_resamples=20, seed=0, pimo_bounds=BOUNDS)
    for interval in out.values():
        assert np.isnan(interval.value) and np.isnan(interval.lo) and interval.n_used == 0


def test_seed_tables():
    row = seed_mean([0.90, 0.92, 0.94])
    assert row.value == pytest.approx(0.92)
    assert row.hi - row.value == pytest.approx(4.302652729911275 * 0.02 / np.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
    other = seed_mean([0.80, 0.81, 0.82])
    assert not indistinguishable(row, other) and indistinguishable(row, seed_mean([0.91, 0.93, 0.95]))
    assert seed_difference([0.9, 0.8], [0.9, 0.8]).p_value == 1.0
    clear = seed_difference([0.90, 0.92, 0.94, 0.93], [0.80, 0.81, 0.82, 0.80])
    assert clear.p_value < 0.01 and clear.lo > 0
    assert np.isnan(seed_mean([0.9]).lo)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=np.arange(14.0)), "labels: expected"),
        (dict(scores=np.zeros(3)), "scores: expected 14"),
        (dict(maps=None), "give both or neither"),
        (dict(masks="short"), "one per label"),
        (dict(labels="mislabelled"), "labelled normal but its mask"),
        (dict(confidence=1.5), "confidence"),
        (dict(n_resamples=0), "n_resamples"),
        (dict(metrics=("pixel_F1",)), "not available"),
        (dict(masks=None, maps=None, metrics=("AUPIMO",)), "not available"),
        (dict(pimo_bounds=(1e-7, 1e-6)), "out of reach"),
    ],
)
def test_bad_input_is_one_clear_value_error(kwargs, message):
    labels, scores, masks, maps = case(7)
    args = dict(labels=labels, scores=scores, masks=masks, maps=maps, n_resamples=10, seed=0, pimo_bounds=BOUNDS)
    args |= kwargs
    if isinstance(kwargs.get("masks"), str):
        args["masks"], args["maps"] = masks[:-1], maps[:-1]
    if isinstance(kwargs.get("labels"), str):
        args["labels"] = np.where(np.arange(len(labels)) == 0, False, labels)
    with pytest.raises(ValueError, match=message):
        bootstrap_intervals(**args)


def test_result_types():
    labels, scores, _, _ = case(8)
    out = bootstrap_intervals(labels, scores, n_resamples=10, seed=0)
    assert isinstance(out["image_AUROC"], Interval)
    d = paired_comparison(labels, None, (scores, None), (-scores, None), n_resamples=10, seed=0)
    assert isinstance(d["image_AUROC"], Difference) and list(d) == ["image_AUROC"]
