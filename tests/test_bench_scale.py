"""bench/scale.py's parts: the generated folder has MVTec AD's shape and passes the download stage's checks, the
commands it runs are the ones DVC ran (dvc.lock), and the growth exponent reads a power law."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from d2dprompt.bench.scale import MVTEC_AD, counts, exponent, generate, params_for, stage_commands

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_is_mvtec_ad_and_a_fraction_keeps_its_shape():
    assert len(MVTEC_AD) == 15
    assert sum(train for _, train, *_ in MVTEC_AD) == 3629 and sum(good + bad for _, _, good, bad, *_ in MVTEC_AD) == 1725
    assert {name for name, *_, grey in MVTEC_AD if grey} == {"grid", "screw", "zipper"}
    small = counts(0.01)
    assert [c[0] for c in small] == [m[0] for m in MVTEC_AD] and min(min(c[1:4]) for c in small) == 2


def test_the_generated_folder_passes_the_download_stages_checks(tmp_path):
    from d2dprompt.pipeline.download import build_dataset

    total = generate(tmp_path / "data", 0.01)
    assert total == sum(sum(c[1:4]) for c in counts(0.01))
    rows = build_dataset("scale", tmp_path / "data", tmp_path / "out", ["bottle", "grid"], move=False, shown_as="scale")
    assert {r.category for r in rows} == {"bottle", "grid"} and sum(r.label for r in rows) == 4
    grid = Image.open(tmp_path / "data/grid/train/good/000.png")
    assert grid.mode == "L" and grid.size == (1024, 1024)
    mask = np.asarray(Image.open(tmp_path / "data/bottle/ground_truth/damage/000_mask.png"))
    assert set(np.unique(mask)) == {0, 255} and Image.open(tmp_path / "data/bottle/test/damage/000.png").size == (900, 900)
    assert generate(tmp_path / "data", 0.01) == total  # kept, not regenerated


def test_the_benchmark_runs_the_commands_dvc_ran():
    """Rendered from dvc.yaml for the sample, every command is the one dvc.lock records for that stage."""
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    planned = stage_commands(dvc_yaml, ["d2dprompt"], Path("data/sample"), 1, dataset="sample")
    assert [name for name, *_ in planned] == ["folder@sample", "latents", "queries", "train@d2dprompt", "evaluate@d2dprompt-sample", "compare@sample"]
    for name, command, outs in planned:
        assert command == " ".join(locked[name]["cmd"].split()), name
        assert {o["path"] for o in locked[name].get("outs", [])} <= set(outs), name


def test_params_for_points_every_stage_at_the_generated_folder():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = params_for(base, Path("/data/scale"), ["bottle"], ["patchknn", "draem"], 256, 1)
    assert params["download"]["folders"] == {"scale": "/data/scale"} and params["download"]["categories"] == ["bottle"]
    assert params["train"]["datasets"] == params["evaluate"]["datasets"] == ["scale"] and params["model"]["image_size"] == 256
    assert params["train"]["epochs"] == params["draem"]["epochs"] == 1  # a listed method's own epochs too
    assert params["decodiff"]["epochs"] == base["decodiff"]["epochs"]  # not listed: as the repository has it
    assert base["download"]["folders"] == {"sample": "data/sample"}  # the repository's params are not touched


def test_the_growth_exponent_reads_a_power_law():
    assert exponent([10, 40, 150], [2.0, 8.0, 30.0]) == pytest.approx(1.0)
    assert exponent([10, 40, 150], [1.0, 16.0, 225.0]) == pytest.approx(2.0)
    assert np.isnan(exponent([10], [1.0]))
