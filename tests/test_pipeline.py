"""End to end: the real stage CLIs on the bundled sample with the tiny model, as `dvc repro` runs them."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest

from d2dprompt.core.data.evaluated import read_evaluated
from tests.conftest import ROOT, pixel_auroc, stage, write_params  # workspace, trained: session fixtures there

METRICS = ("image_AUROC", "image_AP", "image_F1Max", "pixel_AUROC", "pixel_AP", "pixel_AUPRO")
pytestmark = pytest.mark.e2e


def test_download_and_latents_outputs(workspace):
    assert (workspace / "stages/download/sample/manifest.csv").is_file()
    index = (workspace / "stages/latents/sample/index.csv").read_text().splitlines()
    assert len(index) == 1 + 99 + 2 * 48  # header, real images, 2 synthetic anomalies per normal training image
    assert (workspace / "stages/queries/queries.safetensors").is_file()


def test_training_beats_untrained_prompts_and_writes_every_metric(workspace, trained):
    write_params(workspace, train={"untrained": True})
    untrained = stage("train", "--out", "untrained", cwd=workspace)
    assert "without optimising" in untrained.stdout and "epoch 1:" not in untrained.stdout
    assert json.loads((workspace / "untrained/model.json").read_text())["train"]["untrained"] is True
    before = pixel_auroc(workspace, "untrained", "metrics-untrained")
    after = json.loads((workspace / "metrics-trained/sample.json").read_text())
    assert list(after)[:2] == ["mean", "per_category"]  # what people compare first, in the file and in `dvc metrics show`
    categories = {**after["per_category"], "mean": after["mean"]}
    assert set(categories) == {"disc", "tile", "weave", "mean"}
    assert set(after["mean_over"].values()) == {3} and after["undefined"] == {}  # every sample category has defects
    for values in categories.values():
        assert set(METRICS) | {"image_F1", "pixel_F1"} <= set(values)
        assert all(0.0 <= values[m] <= 1.0 for m in METRICS)
    assert "validation split" in after["thresholds"]["source"] and "test" in after["thresholds"]["source"]
    assert 0.0 <= after["validation"]["image_AUROC"] <= 1.0
    table = (workspace / "metrics-trained/sample.md").read_text()
    assert table.count("|") > 20 and "95% percentile bootstrap interval over the test images (200 resamples" in table
    for values in categories.values():  # every headline metric with its interval, around it
        for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "AUPIMO"):
            assert values[f"{name}_lo"] <= values[name] <= values[f"{name}_hi"], (name, values)
        assert re.search(r"\d\.\d{4} \[\d\.\d{3}, \d\.\d{3}\]", table)
    with (workspace / "stages/evaluate-trained/sample/scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    per_image = np.array([float(r["aupimo"]) for r in rows if r["label"] == "1"])
    assert all(r["aupimo"] == "" for r in rows if r["label"] == "0") and ((per_image >= 0) & (per_image <= 1)).all()
    weave = [float(r["aupimo"]) for r in rows if r["label"] == "1" and r["category"] == "weave"]
    assert np.mean(weave) == pytest.approx(after["per_category"]["weave"]["AUPIMO"], abs=1e-12)  # the mean of its images
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["D2D_MLFLOW_URI"])
    logged = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'evaluate'", max_results=500)
    assert any("d2dprompt.sample.mean.pixel_AUPRO_lo" in r.data.metrics and "d2dprompt.sample.weave.AUPIMO_hi" in r.data.metrics for r in logged)
    kept = read_evaluated(workspace / "stages/evaluate-trained/sample/maps.safetensors")  # what compare reads
    assert kept.image_paths == [r["image_path"] for r in rows] and np.allclose(kept.scores, [float(r["score"]) for r in rows])
    print(f"pixel_AUROC untrained {before['mean']['pixel_AUROC']:.4f} trained {after['mean']['pixel_AUROC']:.4f}")
    assert after["mean"]["pixel_AUROC"] > before["mean"]["pixel_AUROC"] + 0.05
    grids = sorted(p.name for p in (workspace / "stages/evaluate-trained/sample/grids").glob("*.png"))
    assert grids == ["disc.png", "tile.png", "weave.png"]
    plots = {p.name for p in (workspace / "stages/evaluate-trained/sample/plots").glob("*.csv")}
    assert {"image_roc.csv", "pixel_roc.csv", "image_pr.csv", "pixel_pr.csv", "bars_pixel_AUROC.csv"} <= plots


def test_predict_scores_a_test_image_as_evaluate_did(workspace, trained):
    import csv

    with (workspace / "stages/evaluate-trained/sample/scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    write_params(workspace, train={"epochs": 4})  # the evaluate block the scores were computed with
    for row in (rows[0], next(r for r in rows if r["label"] == "1")):
        image = workspace / "stages/download/sample" / row["image_path"]
        renamed = workspace / "elsewhere" / "renamed.png"  # another path and name: the score may not change
        renamed.parent.mkdir(exist_ok=True)
        shutil.copy(image, renamed)
        stage("predict", str(renamed), "--trained", "trained", "--out", "predict-one", cwd=workspace)
        (record,) = [json.loads(line) for line in (workspace / "predict-one/predictions.jsonl").read_text().splitlines()]
        assert abs(record["score"] - float(row["score"])) < 1e-5, (row, record["score"])


def test_mlflow_holds_train_and_evaluate_runs(workspace, trained):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["D2D_MLFLOW_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stages = {run.data.tags.get("stage") for run in runs}
    assert {"train", "evaluate"} <= stages
    train = next(r for r in runs if r.data.tags.get("stage") == "train" and r.data.params.get("train.epochs") == "4")
    assert train.data.tags["dvc_exp_name"] == "workspace"
    assert "loss_total" in train.data.metrics
    assert len(client.get_metric_history(train.info.run_id, "loss_total")) == 4
    assert "model.json" in {a.path for a in client.list_artifacts(train.info.run_id)}  # the weights: in its `detector` model
    evaluate = next(r for r in runs if r.data.tags.get("stage") == "evaluate")
    assert "d2dprompt.sample.mean.pixel_AUROC" in evaluate.data.metrics  # <method>.<dataset>.<category>.<metric>
    assert client.list_artifacts(evaluate.info.run_id, "evaluate")


def test_full_mode_paired_trains_and_resumes(workspace):
    write_params(workspace, attention={"mode": "full", "prompts": "paired"}, model={"image_size": 64}, train={"epochs": 1, "batch_size": 48})
    shutil.rmtree(workspace / "stages/latents-64", ignore_errors=True)
    stage("latents", "--out", "stages/latents-64", cwd=workspace)
    first = stage("train", "--latents", "stages/latents-64", "--out", "full", "--checkpoint", "full-ckpt", cwd=workspace)
    assert "epoch 1:" in first.stdout
    assert (workspace / "full-ckpt").is_dir()  # kept: a run changing only fewshot builds its memory from it
    write_params(workspace, attention={"mode": "full", "prompts": "paired"}, model={"image_size": 64}, train={"epochs": 2, "batch_size": 48})
    second = stage("train", "--latents", "stages/latents-64", "--out", "full", "--checkpoint", "full-ckpt", cwd=workspace)
    assert second.stdout.count("epoch 2:") == 1 and "resuming" not in second.stdout  # other epochs: other prompts, from scratch
    assert "left by a run with other params, data or code; training from scratch" in second.stdout


def test_unknown_params_key_stops_every_stage_with_one_line(workspace, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  sharpnes: 0.3\n")
    for name in ("download", "latents", "queries", "train"):
        proc = stage(name, "--params", str(bad), cwd=workspace, check=False)
        assert proc.returncode == 1, name
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"error: {bad}: loss.sharpnes: unknown key" in lines[0], (name, proc.stderr)
    proc = stage("evaluate", "sample", "--params", str(bad), cwd=workspace, check=False)
    assert proc.returncode == 1 and "loss.sharpnes" in proc.stderr


def test_corrupt_image_stops_latents_without_partial_output(workspace, tmp_path):
    data = tmp_path / "downloads/sample"
    shutil.copytree(workspace / "stages/download/sample", data)
    victim = data / "tile/train/good/000.png"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated PNG
    proc = stage("latents", "--downloads", str(tmp_path / "downloads"), "--out", str(tmp_path / "latents"), cwd=workspace, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(victim) in lines[-1]
    assert not (tmp_path / "latents").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latents")]


def test_every_file_evaluate_writes_is_an_out_dvc_tracks(workspace, trained):
    """A file evaluate writes but dvc.yaml does not list is missing from every clone and every `dvc exp apply`: compare
    read replicas.safetensors before it was listed, so a fresh clone's compare stopped on a missing file."""
    import yaml

    evaluate_stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    prefix = "stages/evaluate/${item.method}/${item.dataset}/"
    listed = {(o if isinstance(o, str) else next(iter(o))).removeprefix(prefix) for o in evaluate_stage["outs"] + evaluate_stage["plots"]}
    folder = workspace / "stages/evaluate-trained/sample"
    written = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not any(str(p.relative_to(folder)).startswith(d + "/") for d in listed)}
    assert written <= listed and "replicas.safetensors" in written, written - listed
