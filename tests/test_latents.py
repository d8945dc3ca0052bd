"""The latents stage's core: synthetic rows carry a label only where the image visibly changed."""

from __future__ import annotations


import pytest
import torch

from d2dprompt.core.runtime.config import LatentsParams
from d2dprompt.pipeline.latents import encode_dataset
from d2dprompt.core.data.manifest import ManifestRow
from tests.conftest import ROOT

ROWS = [ManifestRow("sample", "tile", "train", 0, "good", f"tile/train/good/{i:03d}.png", "") for i in range(2)]


@pytest.mark.parametrize("min_change, label", [(8.0, 1), (256.0, 0)])
def test_synthetic_rows_are_labelled_by_what_is_visible(tiny, min_change, label):
    params = LatentsParams(synthetic_per_image=2, val_fraction=0.0, min_change=min_change)
    tensors, index = encode_dataset(tiny, ROOT / "sample", ROWS, 64, params, torch.device("cpu"), "test")
    synthetic = [i for i, row in enumerate(index) if row.source == "synthetic"]
    assert len(synthetic) == 4
    for i in synthetic:
        assert index[i].label == label and int(tensors["labels"][i]) == label
        assert bool(tensors["masks"][i].any()) == bool(label)  # no mask without a label, no label without a mask


def test_a_datasets_own_validation_images_are_the_validation_split(tiny):
    """MVTec AD 2 ships validation/good: those images and their synthetic anomalies are split val, and no
    training image is held out, whatever latents.val_fraction says."""
    rows = [*ROWS[:1], ManifestRow("sample", "tile", "val", 0, "good", "tile/train/good/001.png", "")]
    params = LatentsParams(synthetic_per_image=2, val_fraction=0.5)
    _, index = encode_dataset(tiny, ROOT / "sample", rows, 64, params, torch.device("cpu"), "test")
    splits = {(row.image_path, row.split) for row in index}  # a synthetic row's image_path is its base image
    assert splits == {("tile/train/good/000.png", "train"), ("tile/train/good/001.png", "val")}
    assert sorted(row.source for row in index if row.split == "val") == ["real", "synthetic", "synthetic"]
