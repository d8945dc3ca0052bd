"""A method added from outside src/ (tests/toy_method.py, README "Add a method") runs through train, evaluate and
predict (the real CLIs, told of it by D2D_METHODS), the Python API and the MLflow model: the registry is the only
door, and nothing under src/ names the built-in methods outside methods/."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
BUILT_IN = ("d2d", "anomalyclip", "draem", "decodiff")


def toy_stage(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "D2D_METHODS": "tests.toy_method"}
    proc = subprocess.run([sys.executable, "-m", f"d2dprompt.pipeline.{name}", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def toy_run(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params.update(methods=["toy"], toy={"scale": 0.5})
    (workspace / "toy.yaml").write_text(yaml.safe_dump(params))
    toy_stage("train", "--method", "toy", "--params", "toy.yaml", "--out", "toy-trained", "--checkpoint", "stages/checkpoints/toy", cwd=workspace)
    toy_stage("evaluate", "sample", "--params", "toy.yaml", "--trained", "toy-trained", "--out", "stages/evaluate-toy", "--metrics", "metrics-toy",
              cwd=workspace)
    return workspace


def evaluated_scores(ws) -> list[dict]:
    with (ws / "stages/evaluate-toy/sample/scores.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_the_toy_trains_and_evaluates_through_the_stage_clis(toy_run):
    record = json.loads((toy_run / "toy-trained/model.json").read_text())
    assert record["method"] == "toy" and record["toy"] == {"scale": 0.5}
    metrics = json.loads((toy_run / "metrics-toy/sample.json").read_text())
    assert set(metrics["mean"]) >= {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"}
    thresholds = json.loads((toy_run / "stages/evaluate-toy/sample/thresholds.json").read_text())
    assert thresholds["method"] == "toy" and thresholds["score"] == "toy"  # its own image score, as it declared
    scores = [float(r["score"]) for r in evaluated_scores(toy_run)]
    assert len(scores) == 51 and len(set(scores)) > 1 and all(0 <= s <= 1 for s in scores)


def test_predict_the_api_and_the_mlflow_model_score_as_evaluate_did(toy_run, tmp_path, request):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from d2dprompt import Detector
    from d2dprompt.methods import registry
    from tests.toy_method import ToyMethod

    registry.register(ToyMethod())  # in this process, as a user's import of their module would
    request.addfinalizer(lambda: registry.unregister("toy"))  # the other tests see the built-in methods only
    row = next(r for r in evaluated_scores(toy_run) if r["label"] == "1")
    image = toy_run / "stages/download/sample" / row["image_path"]
    toy_stage("predict", str(image), "--trained", "toy-trained", "--params", "toy.yaml", "--out", str(tmp_path / "out"),
              "--thresholds", "stages/evaluate-toy/sample/thresholds.json", cwd=toy_run)
    predicted = json.loads((tmp_path / "out/predictions.jsonl").read_text().splitlines()[0])
    assert abs(predicted["score"] - float(row["score"])) < 1e-5

    detector = Detector.load(toy_run / "toy-trained", params=toy_run / "toy.yaml", thresholds=toy_run / "stages/evaluate-toy/sample/thresholds.json")
    assert detector.method == "toy" and abs(detector.predict(image).score - float(row["score"])) < 1e-5

    client = MlflowClient(tracking_uri=os.environ["D2D_MLFLOW_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'evaluate' and params.method = 'toy'")
    wanted = (toy_run / "stages/evaluate-toy/sample/scores.csv").read_text()
    run = next(r for r in runs if open(client.download_artifacts(r.info.run_id, "evaluate/scores.csv")).read() == wanted)
    mlflow.set_tracking_uri(os.environ["D2D_MLFLOW_URI"])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/detector")
    out = model.predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert abs(float(out.loc[0, "score"]) - float(row["score"])) < 1e-5


def test_nothing_outside_methods_names_a_built_in_method():
    """Stages, serving and the core reach methods through the registry only: no `if method == "draem"` elsewhere.
    (Benchmarks of particular methods live in their method's folder too.)"""
    named = re.compile(r"""["'](%s)["']""" % "|".join(BUILT_IN))
    found = []
    for path in sorted((ROOT / "src/d2dprompt").rglob("*.py")):
        if "methods" in path.relative_to(ROOT / "src/d2dprompt").parts[:1]:
            continue
        found += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1) if named.search(line)]
    assert not found, "\n".join(found)
