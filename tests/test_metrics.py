"""Metrics against slow, obviously-correct references, scikit-learn, and hand-computed cases."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from d2dprompt.core.eval import metrics
from d2dprompt.core.eval.metrics import (
    aupro,
    f1_max_threshold,
    image_metrics,
    label_regions,
    pixel_metrics,
    summarize,
)


FPR_LIMIT = 0.3  # the field's AUPRO limit, which the hand-computed cases below assume


def reference_aupro(masks, maps, fpr_limit):
    """One threshold per distinct score, regions per image with a full 3x3 structure, plain trapezoids."""
    regions = []
    for image, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labels == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[image][region].mean() for image, region in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < fpr_limit:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return area / fpr_limit


def random_case(seed, n=4, size=20, ties=False):
    """Blob masks (some single pixels) and maps = smooth noise + a signal on the blobs."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 2, 2))
    masks = noise > np.quantile(noise, 0.85)
    masks[rng.random(masks.shape) < 0.01] = True  # isolated single-pixel regions
    masks[0] = False  # one all-normal image
    maps = rng.standard_normal((n, size, size)) + 1.5 * ndimage.gaussian_filter(masks.astype(float), (0, 1, 1))
    if ties:
        maps = np.round(maps * 2) / 2  # many ties, also between normal and anomalous pixels
    return masks, maps.astype(np.float32)


@pytest.fixture(params=["one bucket per key", "shared buckets"])
def bucketing(request, monkeypatch):
    """Run each test with the exact path and with coarse buckets plus tiny chunks (both code paths)."""
    if request.param == "shared buckets":
        monkeypatch.setattr(metrics, "_MAX_BUCKET_BITS", 3)
        monkeypatch.setattr(metrics, "_CHUNK", 97)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fpr_limit", [0.3, 1.0, 0.05, 0.62])
@pytest.mark.parametrize("ties", [False, True])
def test_aupro_matches_slow_reference(bucketing, seed, fpr_limit, ties):
    masks, maps = random_case(seed, ties=ties)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-4)


def test_aupro_toy_case_is_one_sixth():
    # 10 normal pixels and one anomalous pixel (a one-pixel region) in a 1x11 image.
    # One normal pixel (0.9) beats the anomalous one: FPR 0.1, PRO 0. Four normals tie with it at 0.5:
    # one threshold takes all five, so the curve runs straight from (0.1, 0) to (0.5, 1).
    # At the limit 0.3 the line is at PRO 0.5: area = (0.3 - 0.1) * (0 + 0.5) / 2 = 0.05; 0.05 / 0.3 = 1/6.
    maps = np.array([[[0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5]]])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, -1] = True
    assert aupro(masks, maps, 0.3) == pytest.approx(1 / 6, abs=1e-12)


def test_regions_are_8_connected_per_image():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[1, 0, 0] = True  # same place in the next image: a region of its own
    _, n_regions = label_regions(masks)
    assert n_regions == 2
    maps = np.zeros((2, 4, 4))
    maps[1, 0, 0] = 2.0  # found first: PRO 1/2
    maps[0, 0, 0] = 1.0  # then half of the two-pixel region: PRO (1 + 1/2) / 2 = 3/4
    # (1, 1) ties with every normal pixel at 0: straight to (1, 1). Area = (3/4 + 1) / 2 = 0.875.
    # With 4-connectivity (three regions) the curve would reach 2/3 instead, for an area of 0.8333.
    assert aupro(masks, maps, 1.0) == pytest.approx(0.875, abs=1e-12)


def test_perfect_and_inverted_maps():
    masks, _ = random_case(5)
    perfect = masks.astype(np.float32) + 0.1 * np.random.default_rng(0).random(masks.shape, dtype=np.float32)
    assert aupro(masks, perfect, FPR_LIMIT) == pytest.approx(1.0, abs=1e-12)
    result = pixel_metrics(masks, -perfect, FPR_LIMIT)
    assert result["pixel_AUPRO"] == pytest.approx(0.0, abs=1e-12)
    assert result["pixel_AUROC"] == pytest.approx(0.0, abs=1e-12)


def test_constant_map_is_the_diagonal():
    masks, _ = random_case(6)
    result = pixel_metrics(masks, np.full(masks.shape, 0.7, dtype=np.float32), FPR_LIMIT)
    # one threshold: (0, 0) -> (1, 1); area up to 0.3 is 0.3 * 0.3 / 2 = 0.045, / 0.3 = 0.15
    assert result["pixel_AUPRO"] == pytest.approx(0.15, abs=1e-12)
    assert result["pixel_AUROC"] == pytest.approx(0.5, abs=1e-12)
    assert result["pixel_AP"] == pytest.approx(masks.mean(), abs=1e-12)


def test_single_pixel_region():
    maps = np.arange(25, dtype=np.float32).reshape(1, 5, 5)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 2, 2] = True  # score 12; 12 of 24 normal pixels score higher
    assert aupro(masks, maps, 1.0) == pytest.approx(reference_aupro(masks, maps, 1.0), abs=1e-12)
    assert aupro(masks, maps, 1.0) == pytest.approx(0.5, abs=1e-12)


def test_one_class_gives_nan_without_crashing():
    maps = np.random.default_rng(0).random((2, 8, 8))
    for masks in (np.zeros(maps.shape, bool), np.ones(maps.shape, bool)):
        assert np.isnan(aupro(masks, maps, FPR_LIMIT))
        assert all(np.isnan(v) for v in pixel_metrics(masks, maps, FPR_LIMIT).values())
    assert all(np.isnan(v) for v in image_metrics(np.zeros(5), np.arange(5.0)).values())


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_ap_match_sklearn(bucketing, seed):
    masks, maps = random_case(seed, ties=seed % 2 == 1)
    result = pixel_metrics(masks, maps, FPR_LIMIT)
    assert result["pixel_AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-10)
    assert result["pixel_AP"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-10)


def test_float64_signs_zeros_and_extreme_range(bucketing):
    rng = np.random.default_rng(7)
    masks = rng.random((3, 12, 12)) < 0.3
    maps = rng.choice([-1.0, 1.0], masks.shape) * 10.0 ** rng.uniform(-300, 300, masks.shape)
    maps[0, 0, :4] = [-0.0, 0.0, -0.0, 0.0]  # equal scores whatever their sign bit
    masks[0, 0, :4] = [True, False, False, True]
    result = pixel_metrics(masks, maps, FPR_LIMIT)
    assert result["pixel_AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["pixel_AP"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["pixel_AUPRO"] == pytest.approx(reference_aupro(masks, maps, 0.3), abs=1e-4)


def test_metrics_depend_only_on_the_order_of_scores():
    masks, maps = random_case(3, ties=True)
    ranks = np.unique(maps, return_inverse=True)[1].reshape(maps.shape)
    squashed = np.where(ranks == ranks.max(), np.inf, np.where(ranks == 0, -np.inf, ranks * 1e-30))
    assert pixel_metrics(masks, squashed, FPR_LIMIT) == pytest.approx(pixel_metrics(masks, maps, FPR_LIMIT), abs=1e-12)


def brute_force_f1_max(labels, scores):
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & labels)
        best = max(best, 2 * tp / (predicted.sum() + labels.sum()))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(bucketing, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.standard_normal(300) + labels, 1 if seed % 2 else 6)
    f1, threshold = f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)
    predicted = scores >= threshold
    assert 2 * np.sum(predicted & labels) / (predicted.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)
    result = pixel_metrics(labels.reshape(3, 10, 10), scores.reshape(3, 10, 10), FPR_LIMIT)
    assert result["pixel_F1Max"] == pytest.approx(f1, abs=1e-12)


def test_image_metrics_match_sklearn_and_brute_force():
    rng = np.random.default_rng(11)
    labels = (rng.random(120) < 0.6).astype(int)
    scores = rng.standard_normal(120) + labels
    result = image_metrics(labels, scores)
    assert result["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["image_AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["image_F1Max"] == pytest.approx(brute_force_f1_max(labels.astype(bool), scores), abs=1e-12)


def test_bad_inputs_fail_with_the_name_at_fault():
    with pytest.raises(ValueError, match="^masks/maps"):
        pixel_metrics(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)), FPR_LIMIT)
    with pytest.raises(ValueError, match="^scores: contain NaN"):
        pixel_metrics(np.eye(4, dtype=bool)[None], np.full((1, 4, 4), np.nan), FPR_LIMIT)
    with pytest.raises(ValueError, match="^fpr_limit"):
        aupro(np.eye(4, dtype=bool)[None], np.zeros((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="^labels"):
        image_metrics(np.array([0, 2]), np.array([0.1, 0.2]))


def test_summarize_adds_nan_aware_category_mean():
    summary = summarize(
        {
            "bottle": {"image_AUROC": 0.9, "pixel_AUPRO": 0.8},
            "cable": {"image_AUROC": 0.7, "pixel_AUPRO": float("nan")},
        }
    )
    assert summary["mean"]["image_AUROC"] == pytest.approx(0.8)
    assert summary["mean"]["pixel_AUPRO"] == pytest.approx(0.8)
    assert summary["bottle"] == {"image_AUROC": 0.9, "pixel_AUPRO": 0.8}
    assert np.isnan(summarize({"a": {"x": float("nan")}})["mean"]["x"])
    with pytest.raises(ValueError, match="^per_category"):
        summarize({"mean": {}})


def test_the_pooled_pixel_curves_are_scikit_learns_without_sorting_every_pixel():
    """evaluate's pooled pixel plots came from scikit-learn's roc_curve over every pixel: +1.9 GB and 50 s for 534
    maps at 256 px, growing with the dataset. pixel_curves sorts the anomalous pixels only, and gives the same areas
    (ties included) on a polyline whose own trapezoid area and step-wise AP are those areas."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from d2dprompt.core.eval.metrics import pixel_curves

    rng = np.random.default_rng(3)
    maps = np.round(rng.random((6, 32, 32)), 2).astype(np.float32)  # two decimals: many ties across classes
    masks = np.zeros(maps.shape, bool)
    masks[:3, 8:20, 8:20] = True
    maps[masks] += 0.2
    curves = pixel_curves(masks, maps)
    assert curves.auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert curves.ap == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert np.trapezoid(curves.tpr, curves.fpr) == pytest.approx(curves.auroc, abs=1e-12)
    assert np.sum(np.diff(curves.recall) * curves.precision[1:]) == pytest.approx(curves.ap, abs=1e-12)
    assert (curves.fpr[0], curves.tpr[0], curves.fpr[-1], curves.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(curves.fpr) >= 0) and np.all(np.diff(curves.tpr) >= 0) and np.all(np.diff(curves.recall) > 0)
    assert curves.prevalence == masks.mean()
    assert pixel_curves(np.zeros_like(masks), maps) is None
