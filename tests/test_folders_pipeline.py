"""A user's own folders through DVC: each is a tracked input with its own name, and the sample drops out when unlisted."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cmd

pytestmark = pytest.mark.e2e


def test_an_edited_image_in_a_users_folder_reruns_the_pipeline_and_folders_coexist(repo_copy, tmp_path):
    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    bottles, cans = tmp_path / "bottles", tmp_path / "cans"
    for name, category in ((bottles, "disc"), (cans, "tile")):
        shutil.copytree(repo_copy / "sample" / category, name / category)
    overrides = [
        "+download.folders.bottles=" + str(bottles), "+download.folders.cans=" + str(cans), "~download.folders.sample",
        "evaluate.datasets=[bottles,cans]", "train.datasets=[bottles]", "model.image_size=64",
    ]
    run_cmd(["dvc", "exp", "run", "latents", *[a for o in overrides for a in ("-S", o)]], clone)  # as a user would, up to latents
    stages = run_cmd(["dvc", "stage", "list"], clone).stdout
    assert "folder@bottles" in stages and "folder@cans" in stages and "folder@sample" not in stages
    assert "sample" not in run_cmd(["dvc", "dag", "latents"], clone).stdout  # the unlisted sample is no input
    assert sorted(p.name for p in (clone / "stages/download").iterdir()) == ["bottles", "cans"]
    assert sorted(p.name for p in (clone / "stages/latents").iterdir()) == ["bottles", "cans"]
    assert "up to date" in run_cmd(["dvc", "status", "--with-deps", "latents"], clone).stdout

    edited = bottles / "disc/train/good/000.png"
    pixels = np.array(Image.open(edited))
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(edited)
    status = run_cmd(["dvc", "status", "--with-deps", "latents"], clone).stdout
    assert "folder@bottles" in status and "modified" in status and "folder@cans" not in status, status
    rerun = run_cmd(["dvc", "repro", "latents"], clone).stdout
    assert "Running stage 'folder@bottles'" in rerun and "Running stage 'latents'" in rerun
    assert "Running stage 'folder@cans'" not in rerun
    prepared = clone / "stages/download/bottles/disc/train/good/000.png"
    assert prepared.read_bytes() == edited.read_bytes()


def test_a_folder_without_masks_runs_end_to_end_with_image_metrics_and_pixel_metrics_na(tmp_path):
    """A factory's defect images often come without pixel masks. A category without ground_truth/ runs through the
    real stage CLIs: its image metrics are computed, its pixel metrics are n/a (an empty mask would score the defect's
    pixels as normal) with a note saying why, and the mean's pixel metrics stand on the categories that have masks."""
    import json

    from d2dprompt.core.data.evaluated import read_evaluated
    import yaml

    from tests.conftest import ROOT, stage

    folder = tmp_path / "factory"
    for category in ("disc", "tile"):
        shutil.copytree(ROOT / "sample" / category, folder / category)
    shutil.rmtree(folder / "tile" / "ground_truth")
    params = {"download": {"folders": {"factory": str(folder)}}, "methods": ["patchknn"], "model": {"image_size": 64},
              "train": {"datasets": ["factory"]}, "fewshot": {"k": 2},
              "evaluate": {"datasets": ["factory"], "map_size": 64, "grid_cases": 1, "bootstrap": 100, "aupimo_fpr": [1.0e-3, 1.0e-2]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = stage("download", cwd=tmp_path)
    prepared = prepared.stdout + prepared.stderr
    assert "no masks in tile: image-level metrics only there" in prepared
    stage("latents", cwd=tmp_path)
    stage("train", "--method", "patchknn", cwd=tmp_path)
    stage("evaluate", "factory", "--trained", "stages/train/patchknn", "--out", "stages/evaluate/patchknn", "--metrics", "metrics/patchknn", cwd=tmp_path)
    record = json.loads((tmp_path / "metrics/patchknn/factory.json").read_text())
    tile, disc = record["per_category"]["tile"], record["per_category"]["disc"]
    assert 0.0 <= tile["image_AUROC"] <= 1.0 and 0.0 <= tile["image_F1"] <= 1.0
    assert all(tile[name] is None for name in ("pixel_AUROC", "pixel_AUPRO", "AUPIMO", "pixel_F1"))
    assert all(0.0 <= disc[name] <= 1.0 for name in ("pixel_AUROC", "pixel_AUPRO", "pixel_F1"))
    assert record["mean"]["pixel_AUROC"] == disc["pixel_AUROC"] and record["mean_over"]["pixel_AUROC"] == 1
    assert "pixel metrics n/a for tile: its anomalous images have no masks (no ground_truth/)" in record["notes"]
    assert "tile_lo" not in json.dumps(record) and "image_AUROC_lo" in tile and "pixel_AUROC_lo" not in tile
    evaluated = read_evaluated(tmp_path / "stages/evaluate/patchknn/factory/maps.safetensors")
    assert evaluated.without_masks == ("tile",)


def test_a_folder_of_good_images_only_trains_fits_thresholds_and_serves(tmp_path):
    """A line that has never kept a defect still wants a detector: a folder without test/ trains, evaluate fits its
    thresholds on the validation split (held-out normal images and their synthetic anomalies) and says that the test
    metrics need test images, and predict scores new images with those thresholds."""
    import json

    import yaml

    from tests.conftest import ROOT, stage

    folder = tmp_path / "goodonly"
    shutil.copytree(ROOT / "sample" / "disc" / "train", folder / "disc" / "train")
    params = {"download": {"folders": {"goodonly": str(folder)}}, "methods": ["patchknn"], "model": {"image_size": 64},
              "train": {"datasets": ["goodonly"]}, "fewshot": {"k": 2},
              "evaluate": {"datasets": ["goodonly"], "map_size": 64, "grid_cases": 1, "bootstrap": 100, "aupimo_fpr": [1.0e-3, 1.0e-2]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = stage("download", cwd=tmp_path)
    assert "test 0 (0 good, 0 anomalous)" in prepared.stdout + prepared.stderr
    stage("latents", cwd=tmp_path)
    stage("train", "--method", "patchknn", cwd=tmp_path)
    evaluated = stage("evaluate", "goodonly", "--trained", "stages/train/patchknn", "--out", "stages/evaluate/patchknn", "--metrics",
                      "metrics/patchknn", cwd=tmp_path)
    assert "no test images" in evaluated.stdout
    record = json.loads((tmp_path / "metrics/patchknn/goodonly.json").read_text())
    assert record["per_category"] == {} and record["thresholds"]["source"].startswith("F1-max on the validation split")
    assert any(note.startswith("no test images in disc") for note in record["notes"])
    assert record["validation"]["image_AUROC"] is not None
    thresholds = json.loads((tmp_path / "stages/evaluate/patchknn/goodonly/thresholds.json").read_text())
    image = ROOT / "sample" / "disc" / "test" / "good" / sorted(p.name for p in (ROOT / "sample/disc/test/good").iterdir())[0]
    stage("predict", str(image), "--trained", "stages/train/patchknn", "--thresholds", "stages/evaluate/patchknn/goodonly/thresholds.json",
          "--out", "predicted", cwd=tmp_path)
    assert thresholds["image"] == thresholds["image"] and (tmp_path / "predicted").is_dir()
