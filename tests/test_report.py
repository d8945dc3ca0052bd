"""Pictures people look at: one colour scale for a run's grids and predict overlays, titles that fit."""

from __future__ import annotations

import numpy as np
from PIL import Image

from d2dprompt.core.eval.overlays import MIN_PANEL, render_overlay
from d2dprompt.core.eval.report import display_range, jet, scaled


def test_the_display_range_is_the_maps_own_and_scales_values_alike_everywhere():
    maps = np.linspace(0.4, 0.6, 10_001).reshape(1, -1)
    low, high = display_range(maps)
    assert abs(low - 0.4002) < 1e-6 and abs(high - 0.5998) < 1e-6
    assert display_range(np.full((2, 4, 4), 0.5)) == (0.5, 1.5)  # a flat map still gets a usable scale
    assert np.array_equal(jet(scaled(np.array([0.5]), (0.4, 0.6))), jet(np.array([0.5 / 1.0])))


def test_the_overlay_colours_the_map_on_the_given_range_and_wraps_a_long_title():
    amap = np.full((64, 64), 0.5, dtype=np.float32)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    title = "a/very/long/path/" * 12 + "x.png   score 0.5000 vs 0.4000 -> anomalous\nthresholds: from a file"
    page = render_overlay(image, amap, np.zeros((64, 64), bool), title, display=(0.4, 0.6))
    short = render_overlay(image, amap, np.zeros((64, 64), bool), "x.png", display=(0.4, 0.6))
    assert page.width == short.width == 3 * MIN_PANEL + 8 and page.height > short.height  # more title lines, not cut
    centre = np.asarray(page)[page.height - MIN_PANEL // 2 - 40, MIN_PANEL + 4 + MIN_PANEL // 2]
    assert tuple(centre) == tuple(jet(np.array([0.5]))[0])  # 0.5 on (0.4, 0.6) is mid-ramp, as in the grids
    assert isinstance(page, Image.Image)
