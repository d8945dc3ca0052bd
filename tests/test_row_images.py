"""Methods that read pixels rebuild exactly the rows the latents stage encoded: same images, masks, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2dprompt.core.runtime.config import LatentsParams
from d2dprompt.core.data.latent_store import LATENT_DTYPE
from d2dprompt.pipeline.latents import encode_dataset
from d2dprompt.core.data.manifest import ManifestRow
from d2dprompt.core.models import encode
from d2dprompt.core.data.row_images import row_image
from tests.conftest import ROOT

ROWS = [ManifestRow("sample", "tile", "train", 0, "good", f"tile/train/good/{i:03d}.png", "") for i in range(2)] + [
    ManifestRow("sample", "tile", "test", 1, "crack", "tile/test/crack/000.png", "tile/ground_truth/crack/000_mask.png")
]
SIZE = 64


def test_rebuilt_rows_encode_to_the_stored_latents(tiny):
    params = LatentsParams(synthetic_per_image=2, val_fraction=0.0)
    tensors, index = encode_dataset(tiny, ROOT / "sample", ROWS, SIZE, params, torch.device("cpu"), "test")
    assert {r.source for r in index} == {"real", "synthetic"} and len(index) <= params.batch_size  # one VAE batch
    rebuilt = [row_image(ROOT / "sample", row, SIZE, SIZE, params, []) for row in index]
    again = encode(tiny, [image for image, _ in rebuilt], torch.device("cpu")).to(LATENT_DTYPE)
    assert torch.equal(again, tensors["latents"])  # bit for bit: the same pixels went in
    assert [int(mask.any()) for _, mask in rebuilt] == [row.label for row in index]


def test_rows_at_another_size_are_the_same_anomaly_resized(tiny):
    params = LatentsParams(synthetic_per_image=1, val_fraction=0.0)
    _, index = encode_dataset(tiny, ROOT / "sample", ROWS[:1], SIZE, params, torch.device("cpu"), "test")
    synthetic = next(r for r in index if r.source == "synthetic")
    small, small_mask = row_image(ROOT / "sample", synthetic, 32, SIZE, params, [])
    full, full_mask = row_image(ROOT / "sample", synthetic, SIZE, SIZE, params, [])
    assert small.shape == (32, 32, 3) and small_mask.shape == (32, 32)
    assert abs(small_mask.mean() - full_mask.mean()) < 0.05  # the same defect, not a new draw
    assert np.abs(small.astype(float) - full[::2, ::2].astype(float)).mean() < 20


def test_a_row_the_latents_params_no_longer_produce_is_refused(tiny):
    params = LatentsParams(synthetic_per_image=1, val_fraction=0.0)
    _, index = encode_dataset(tiny, ROOT / "sample", ROWS[:1], SIZE, params, torch.device("cpu"), "test")
    synthetic = next(r for r in index if r.source == "synthetic")
    with pytest.raises(ValueError, match="rerun it"):
        row_image(ROOT / "sample", synthetic, SIZE, SIZE, params.model_copy(update={"min_change": 256.0}), [])
