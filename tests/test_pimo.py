"""AUPIMO against anomalib's reference values, a brute-force reimplementation, and hand-built cases."""

import numpy as np
import pytest

from d2dprompt.core.eval.pimo import (
    WeightedAUPIMO,
    aupimo,
    index_at_fpr,
    pimo_curves,
    shared_thresholds,
    threshold_bins,
)


def case(seed, n=16, n_anomalous=8, size=128, dtype=np.float64, quantize=None):
    """Discs (plus scattered pixels) on the first images; maps = noise + a per-image signal on the masks.

    Do not change: the reference values below were computed on exactly these arrays.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n_anomalous):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(2, size // 4))]
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[i][rng.random((size, size)) < 0.002] = True  # scattered single pixels
    strength = np.linspace(2.0, 8.0, n)[:, None, None]  # AUPIMO spread over (0, 1)
    maps = rng.standard_normal((n, size, size)) + strength * masks
    if quantize:
        maps = np.clip(np.round(maps * quantize) / quantize, -2.0, 2.5)  # ties, also with thresholds
    return masks, maps.astype(dtype)


# Produced by anomalib 2.7.0 `anomalib.metrics.pimo.functional.aupimo_scores(torch.from_numpy(maps),
# torch.from_numpy(masks), num_thresholds=K, fpr_bounds=bounds, force=force)` with torch 2.13.0+cpu and
# numpy 2.4.6 (pip install anomalib==2.7.0 --no-deps into a scratch venv; the pimo package's files were
# loaded standalone, as they import only torch and numpy). Values of the anomalous images; normal ones are nan.
REFERENCE = {
    "default_f64": dict(
        case=dict(seed=0), bounds=(1e-5, 1e-4), K=300_000, force=False, points=16106,
        checksum=17317.135385142046, mask_sum=5160,
        aupimo=[0.0214233257274079, 0.05839551408542337, 0.10007926381131864, 0.22471350108367893,
                0.3843548002524636, 0.5620858966238961, 0.729049478279372, 0.8664215924756706],
    ),
    "f32_coarse": dict(
        case=dict(seed=1, n=12, n_anomalous=5, size=64, dtype=np.float32), bounds=(1e-3, 1e-2), K=10_000,
        force=False, points=1060, checksum=2506.1037507107576, mask_sum=1066,
        aupimo=[0.19739393581751866, 0.3674791880788369, 0.6479830380400107, 0.7829175509854588,
                0.9293070291763945],
    ),
    "ties_forced": dict(  # scores on a 1/16 lattice, every 4th threshold exactly on it; 22 points: forced
        case=dict(seed=2, n=10, n_anomalous=4, size=64, quantize=16), bounds=(1e-2, 1e-1), K=97, force=True,
        points=22, checksum=1817.9375, mask_sum=783,
        aupimo=[0.7052228437047039, 0.7285250480013314, 0.9122089940202253, 0.9438535956192837],
    ),
    "f32_default": dict(
        case=dict(seed=3, dtype=np.float32), bounds=(1e-5, 1e-4), K=300_000, force=False, points=8780,
        checksum=21390.222465249502, mask_sum=6474,
        aupimo=[0.029944713771689155, 0.06170176407183101, 0.13911820055393948, 0.1610086269594519,
                0.41475068654975483, 0.6206843036540671, 0.8030376129570975, 0.9103154015237624],
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_matches_anomalib_reference(name):
    ref = REFERENCE[name]
    masks, maps = case(**ref["case"])
    assert float(maps.astype(np.float64).sum()) == pytest.approx(ref["checksum"], abs=1e-6)  # same inputs
    assert int(masks.sum()) == ref["mask_sum"]
    result = aupimo(masks, maps, ref["bounds"], ref["K"], force=ref["force"])
    n_anomalous = len(ref["aupimo"])
    np.testing.assert_allclose(result.per_image[:n_anomalous], ref["aupimo"], rtol=0, atol=1e-6)
    assert np.isnan(result.per_image[n_anomalous:]).all()
    assert result.mean == pytest.approx(np.mean(ref["aupimo"]), abs=1e-6)
    assert result.num_points == ref["points"]


def brute_force(masks, maps, bounds, num_thresholds, force=False):
    """The reference algorithm written plainly: every threshold compared with every pixel."""
    masks = masks.astype(bool)
    normal = ~masks.any(axis=(1, 2))
    # Python floats: the linspace runs in float64 and is rounded to the maps' dtype, as the authors' numpy code
    thresholds = np.linspace(float(maps[normal].min()), float(maps[normal].max()), num_thresholds, dtype=maps.dtype)
    fprs = np.array([[(maps[i] >= t).mean() for t in thresholds] for i in np.flatnonzero(normal)])
    shared = fprs.mean(axis=0)
    tprs = np.full((len(maps), num_thresholds), np.nan)
    for i in np.flatnonzero(~normal):
        tprs[i] = [(maps[i][masks[i]] >= t).mean() for t in thresholds]

    def index(level):
        return int(np.argmin(np.abs(shared - level)))

    first, last = index(bounds[1]), index(bounds[0])
    x = np.log(shared[first : last + 1])[::-1]
    y = tprs[:, first : last + 1][:, ::-1]
    finite = np.isfinite(x)
    assert force or finite.sum() > 30
    x, y = x[finite], y[:, finite]
    area = np.sum((x[1:] - x[:-1]) * (y[:, 1:] + y[:, :-1]) / 2, axis=1) / np.log(bounds[1] / bounds[0])
    return thresholds, shared, tprs, np.clip(area, 0, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(seed, dtype):
    masks, maps = case(seed + 10, n=7, n_anomalous=3, size=24, dtype=dtype, quantize=8 if seed else None)
    bounds, k = (3e-2, 3e-1), 400
    thresholds, shared, tprs, expected = brute_force(masks, maps, bounds, k)
    curves = pimo_curves(masks, maps, k)
    np.testing.assert_array_equal(curves.thresholds, thresholds)
    np.testing.assert_allclose(curves.shared_fpr, shared, rtol=1e-12)
    np.testing.assert_allclose(curves.per_image_tpr, tprs, rtol=1e-12)
    assert curves.image_classes.tolist() == [1, 1, 1, 0, 0, 0, 0]
    result = aupimo(masks, maps, bounds, k)
    np.testing.assert_allclose(result.per_image, expected, rtol=0, atol=1e-12)
    assert result.mean == pytest.approx(np.nanmean(expected), abs=1e-12)
    assert result.thresh_bounds[0] < result.thresh_bounds[1]


def test_threshold_bins_equal_searchsorted_even_on_thresholds_and_duplicates():
    rng = np.random.default_rng(0)
    for thresholds in (
        np.linspace(-1.0, 2.0, 1000),
        np.linspace(1.0, 1.0 + 1e-5, 5000, dtype=np.float32),  # float32 rounding: many repeated thresholds
    ):
        values = np.concatenate((
            rng.uniform(thresholds[0] - 0.1, thresholds[-1] + 0.1, 5000).astype(thresholds.dtype),
            thresholds[rng.integers(0, thresholds.size, 500)],  # exactly on a threshold
        ))
        np.testing.assert_array_equal(threshold_bins(values, thresholds), np.searchsorted(thresholds, values, "right"))


def test_perfect_and_hopeless_maps():
    masks, maps = case(4, n=8, n_anomalous=3, size=64)
    perfect = np.where(masks, 10.0, maps)  # anomalous pixels above every normal score
    hopeless = np.where(masks, -10.0, maps)  # anomalous pixels below every normal score
    assert aupimo(masks, perfect, (1e-3, 1e-2)).mean == 1.0
    assert aupimo(masks, hopeless, (1e-3, 1e-2)).mean == 0.0


def test_undefined_without_normal_or_anomalous_images():
    masks, maps = case(5, n=4, n_anomalous=4, size=16)
    assert np.isnan(aupimo(masks, maps, (1e-2, 1e-1)).per_image).all()  # no normal image
    assert np.isnan(aupimo(np.zeros_like(masks), maps, (1e-2, 1e-1)).mean)  # no anomalous image
    with pytest.raises(ValueError, match="at least one normal image"):
        pimo_curves(masks, maps, 100)


def test_index_at_fpr_picks_the_first_nearest_threshold():
    shared = np.array([1.0, 1.0, 0.5, 0.5, 0.1, 0.1, 0.0])
    assert index_at_fpr(shared, 0.5) == 2
    assert index_at_fpr(shared, 0.11) == 4
    assert index_at_fpr(shared, 1.0) == 1  # level 1: the highest threshold still at FPR 1
    with pytest.raises(ValueError, match="out of reach"):
        index_at_fpr(shared[:-1], 0.01)


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda m, s: (m[0], s), {}, "equal shapes"),
        (lambda m, s: (m * 2, s), {}, "binary"),
        (lambda m, s: (m, np.where(m, np.nan, s)), {}, "NaN or inf"),
        (lambda m, s: (m, s.astype(complex)), {}, "real-valued"),
        (lambda m, s: (m, s), {"fpr_bounds": (1e-2, 1e-3)}, "0 < lower < upper <= 1"),
        (lambda m, s: (m, s), {"num_thresholds": 1}, "integer >= 2"),
        (lambda m, s: (m, s), {"fpr_bounds": (1e-7, 1e-6)}, "out of reach"),  # 5k normal pixels
        (lambda m, s: (m, s), {"num_thresholds": 50}, "raise num_thresholds"),
        (lambda m, s: (m, np.where(m, s, 0.0)), {}, "all equal"),
    ],
)
def test_bad_input_is_one_clear_value_error(change, kwargs, message):
    masks, maps = case(6, n=6, n_anomalous=1, size=32)
    masks, maps = change(masks.astype(np.uint8), maps)
    with pytest.raises(ValueError, match=message):
        aupimo(masks, maps, **{"fpr_bounds": (1e-3, 1e-2), **kwargs})


def test_float32_thresholds_stay_float32():
    masks, maps = case(7, n=5, n_anomalous=2, size=32, dtype=np.float32)
    thresholds = shared_thresholds(maps[2:], 1000)
    assert thresholds.dtype == np.float32
    assert thresholds[0] == maps[2:].min() and thresholds[-1] == maps[2:].max()


def test_weighted_aupimo_at_unit_weights_is_the_exact_mean():
    masks, maps = case(8, n=12, n_anomalous=5, size=48, dtype=np.float32)
    weighted = WeightedAUPIMO(masks, maps, (1e-3, 1e-2))
    assert weighted(np.ones(12))[0] == pytest.approx(aupimo(masks, maps, (1e-3, 1e-2)).mean, abs=1e-12)
    no_normal = np.r_[np.ones(5), np.zeros(7)]  # no normal image drawn: undefined
    assert np.isnan(weighted(no_normal)[0])
    with pytest.raises(ValueError, match="multiplicities"):
        weighted(np.ones(11))


def test_aupimo_per_image_reports_undefined_maps_but_raises_on_malformed_ones():
    """Flat normal maps are a property of the data (n/a, with the reason); NaN in the maps is a bug upstream and must
    not read as "AUPIMO n/a": catching every ValueError hid it."""
    from d2dprompt.core.eval.uncertainty import aupimo_per_image

    masks = np.zeros((4, 8, 8), bool)
    masks[2:, 2:5, 2:5] = True
    maps = np.where(masks, 1.0, 0.25)
    mean, per_image, why = aupimo_per_image(masks, maps, (1e-5, 1e-4))
    assert np.isnan(mean) and np.isnan(per_image).all() and "all equal" in why
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aupimo_per_image(masks, maps, (1e-5, 1e-4))
