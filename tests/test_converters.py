"""Dataset conversion helpers (core/data/converters.py) on masks built here."""

from __future__ import annotations

import numpy as np
from PIL import Image

from d2dprompt.core.data.converters import binary_mask


def test_a_class_id_mask_keeps_every_defect(tmp_path):
    """Ids 1 and 2 (two defects of one image) both become defect pixels: keeping the pixels above half the mask's
    peak dropped the id-1 defect silently."""
    values = np.zeros((8, 8), np.uint8)
    values[1:3, 1:3], values[5:7, 5:7] = 1, 2
    Image.fromarray(values).save(tmp_path / "ids.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    binary_mask(tmp_path / "ids.png", tmp_path / "image.png", tmp_path / "out.png")
    written = np.asarray(Image.open(tmp_path / "out.png"))
    assert set(np.unique(written)) == {0, 255} and np.array_equal(written > 0, values > 0)
