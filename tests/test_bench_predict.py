"""bench_predict: generates a folder, runs the real predict CLI on it and reports speed and peak memory."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from d2dprompt.bench.predict import write_images
from tests.conftest import run_cmd


def test_generated_images_are_a_function_of_their_index(tmp_path):
    write_images(tmp_path / "a", 3, 64)
    write_images(tmp_path / "b", 2, 64)
    first = [np.asarray(Image.open(tmp_path / "a" / f"{i:05d}.png")) for i in range(3)]
    assert first[0].shape == (64, 64, 3) and not np.array_equal(first[0], first[1])
    assert np.array_equal(first[1], np.asarray(Image.open(tmp_path / "b/00001.png")))


@pytest.mark.e2e
def test_the_benchmark_runs_predict_and_reports_peak_memory(trained, tmp_path):
    import sys

    proc = run_cmd([sys.executable, "-m", "d2dprompt.bench.predict", "--images", "6", "--side", "160", "--trained", str(trained),
                    "--batch-size", "4", "--workers", "1"], cwd=tmp_path)
    assert "6 of 6 images" in proc.stdout, proc.stdout
    own, tree = map(int, re.search(r"predict (\d+) MiB RSS, predict \+ its workers (\d+) MiB PSS", proc.stdout).groups())
    assert 50 < own < 8000 and 50 < tree < 16000
