"""Thresholds, binary masks and F1: small hand-built maps whose right answer is known."""

import numpy as np
import pytest

from d2dprompt.core.eval.thresholds import (
    Thresholds,
    binary_masks,
    f1_at,
    fit_f1_threshold,
    fit_pixel_threshold,
    fit_thresholds,
    image_labels_from,
    sensitivity_threshold,
)


def square_with_specks():
    maps = np.zeros((2, 16, 16), dtype=np.float32)
    maps[0, 4:10, 4:10] = 0.9  # a 6x6 defect
    maps[0, 0, 15] = maps[0, 14, 1] = 0.95  # one-pixel specks
    maps[1, 8, 3:14] = 0.8  # a one-pixel-thin line in the second image
    return maps


def test_threshold_alone_keeps_everything_at_or_above_it():
    maps = square_with_specks()
    masks = binary_masks(maps, threshold=0.8)
    assert masks.sum() == 36 + 2 + 11
    assert binary_masks(maps, threshold=0.9).sum() == 36 + 2  # >= threshold, not >


@pytest.mark.parametrize("no_opening", [0, 1])
def test_opening_removes_specks_thinner_than_the_kernel(no_opening):
    maps = square_with_specks()
    opened = binary_masks(maps, threshold=0.5, opening_kernel=3)
    expected = np.zeros(maps.shape, dtype=bool)
    expected[0, 4:10, 4:10] = True  # the square survives exactly; specks and the thin line go
    np.testing.assert_array_equal(opened, expected)
    assert binary_masks(maps, 0.5, opening_kernel=no_opening).sum() == 36 + 2 + 11


def test_min_area_drops_small_8_connected_regions_per_image():
    maps = np.zeros((2, 10, 10))
    maps[0, 1:3, 1:3] = 1.0  # 4 pixels
    maps[0, 3, 3] = 1.0  # touches the square diagonally: one region of 5 pixels
    maps[0, 6:9, 6:9] = 1.0  # 9 pixels
    maps[1, 1:3, 1:3] = 1.0  # 4 pixels, stacked on image 0's square: must not join it
    masks = binary_masks(maps, threshold=0.5, min_area=5)
    assert masks[0].sum() == 5 + 9
    assert not masks[1].any()
    assert binary_masks(maps, 0.5, min_area=10).sum() == 0
    assert binary_masks(maps, 0.5, min_area=0).sum() == maps.astype(bool).sum()


def test_f1_threshold_maximises_f1_on_the_fit_data():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    scores = rng.standard_normal(400) + 1.2 * labels
    threshold = fit_f1_threshold(labels, scores)
    best = f1_at(labels, scores >= threshold)
    assert all(f1_at(labels, scores >= t) <= best + 1e-12 for t in np.unique(scores))
    assert best > f1_at(labels, scores >= np.median(scores))


def test_pixel_f1_threshold_from_masks_and_maps():
    maps = square_with_specks()
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 4:10, 4:10] = True
    threshold = fit_f1_threshold(masks, maps)
    assert threshold == pytest.approx(0.9)  # keeps the square, drops the line; the specks cost 2 FP
    assert f1_at(masks, maps >= threshold) == pytest.approx(2 * 36 / (2 * 36 + 2))


def test_f1_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="^labels"):
        fit_f1_threshold(np.zeros(10, bool), np.arange(10.0))


def test_fit_thresholds_records_its_source():
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    masks = rng.random((3, 6, 6)) < 0.2
    maps = masks + 0.5 * rng.random((3, 6, 6))
    result = fit_thresholds(labels, scores, masks, maps, source="f1-max on validation", opening_kernel=0, min_area=0)
    assert result == Thresholds(image=0.35, pixel=result.pixel, source="f1-max on validation")
    assert f1_at(masks, maps >= result.pixel) == 1.0  # the maps separate the masks perfectly


def test_pixel_threshold_is_fitted_on_the_post_processed_masks():
    """A defect whose core is a checkerboard of high values on a lower plateau, and isolated specks.

    On raw maps the high checkerboard alone is F1-optimal; opening erases a checkerboard, so applied
    after opening that threshold finds nothing. Fitted on the opened masks, the plateau wins.
    """
    maps = np.full((2, 32, 32), 0.1)
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:16, 8:16] = True
    maps[masks] = 0.4
    yy, xx = np.mgrid[8:16, 8:16]
    maps[:, yy[(yy + xx) % 2 == 0], xx[(yy + xx) % 2 == 0]] = 0.7
    rng = np.random.default_rng(0)
    specks = rng.choice(np.flatnonzero(~masks[0].ravel() & (np.arange(1024) % 2 == 0)), 150, replace=False)
    maps.reshape(2, -1)[:, specks] = 0.5
    raw = fit_f1_threshold(masks, maps)
    assert f1_at(masks, binary_masks(maps, raw, 3, 4)) == 0.0  # what fitting on raw maps gave
    fitted = fit_pixel_threshold(masks, maps, opening_kernel=3, min_area=4)
    assert f1_at(masks, binary_masks(maps, fitted, 3, 4)) == 1.0
    assert fit_pixel_threshold(masks, maps, opening_kernel=0, min_area=0) == raw  # no post-processing: exact raw F1-max


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sensitivity_threshold_bounds_the_normal_false_positive_rate(dtype):
    scores = np.array([0.1, 0.2, 0.2, 0.3, 0.5, 0.5, 0.5, 0.7, 0.8, 0.9], dtype=dtype)
    t = sensitivity_threshold(scores, max_fpr=0.2)  # at most 2 of 10 flagged
    assert (scores >= dtype(t)).sum() == 2 and (scores >= t).sum() == 2
    assert t <= 0.8  # lowest such threshold: anything <= 0.7 flags 3
    t = sensitivity_threshold(scores, max_fpr=0.35)  # 3 allowed, but 0.5 comes as three: only 3 flagged
    assert (scores >= t).sum() == 3 and t <= 0.7 + 1e-6
    assert (scores >= sensitivity_threshold(scores, 0.0)).sum() == 0
    assert (scores >= sensitivity_threshold(scores, 1.0)).sum() == 10


def test_image_labels_from_masks_or_scores():
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[1, 2, 2] = True
    np.testing.assert_array_equal(image_labels_from(masks), [False, True, False])
    np.testing.assert_array_equal(image_labels_from(np.array([0.2, 0.5, 0.7]), threshold=0.5), [False, True, True])
    with pytest.raises(ValueError, match="^threshold"):
        image_labels_from(np.array([0.2, 0.5]))
    with pytest.raises(ValueError, match="^values"):
        image_labels_from(np.zeros((3, 4, 4)), threshold=0.5)


def test_f1_at_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    predictions = np.array([1, 1, 0, 1, 0, 0], dtype=bool)  # TP 2, FN 1, FP 1
    assert f1_at(labels, predictions) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_at(labels, labels) == 1.0
    assert np.isnan(f1_at(np.zeros(4, bool), np.zeros(4, bool)))
    with pytest.raises(ValueError, match="^labels/predictions"):
        f1_at(labels, predictions[:5])
