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
