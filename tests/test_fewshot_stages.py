"""Batch zero-shot D2D-Prompt (fewshot.mutual) through the real train, evaluate and predict CLIs on the sample:
no memory is kept, evaluate scores each category's images against each other, and predict says why it cannot."""

from __future__ import annotations

import json

from tests.conftest import stage, write_params


def test_batch_zero_shot_runs_through_train_and_evaluate_and_predict_refuses_it_in_one_line(workspace, tmp_path):
    params = str(write_params(tmp_path, fewshot={"mutual": True, "fusion": 0.5}, train={"epochs": 1}))
    trained = tmp_path / "mutual"
    stage("train", "--params", params, "--out", str(trained), "--checkpoint", str(tmp_path / "ckpt"), cwd=workspace)
    record = json.loads((trained / "model.json").read_text())
    assert record["fewshot"]["mutual"] and record["categories"] == ["sample/disc", "sample/tile", "sample/weave"]
    for entry in record["memory"].values():  # no reference image: only the normalisation, from the validation split's normal images
        assert entry["references"] == [] and entry["rows"] == 0 and entry["memory_stats"][1] > 0 and entry["prompt_stats"][1] > 0
    stage("evaluate", "sample", "--params", params, "--trained", str(trained), "--out", str(tmp_path / "evaluate"),
          "--metrics", str(tmp_path / "metrics"), cwd=workspace)
    mean = json.loads((tmp_path / "metrics/sample.json").read_text())["mean"]
    assert 0 <= mean["image_AUROC"] <= 1 and 0 <= mean["pixel_AUPRO"] <= 1
    image = next((workspace / "stages/download/sample/disc/test").rglob("*.png"))
    refused = stage("predict", str(image), "--trained", str(trained), "--out", str(tmp_path / "out"), "--category", "sample/disc",
                    cwd=workspace, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "scores a category's test images against each other (fewshot.mutual: true)" in refused.stderr
