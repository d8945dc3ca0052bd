"""The MLflow model every evaluate run logs and registers (mlflow_model.py): loaded back by MLflow, from the run or
the registry, it scores and decides as evaluate did."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def detector_run(workspace) -> str:
    """The evaluate run that wrote stages/evaluate-trained/sample (its scores.csv, logged as an artifact)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["D2D_MLFLOW_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'evaluate' and attributes.status = 'FINISHED'")
    wanted = (workspace / "stages/evaluate-trained/sample/scores.csv").read_text()
    for run in runs:
        try:
            logged = client.download_artifacts(run.info.run_id, "evaluate/scores.csv")
        except Exception:  # noqa: BLE001 - a run without that artifact is not the one
            continue
        if open(logged).read() == wanted:
            return run.info.run_id
    raise AssertionError("no evaluate run logged stages/evaluate-trained/sample")


def test_the_logged_detector_loads_and_scores_sample_images_as_evaluate_did(workspace, trained):
    import mlflow
    import pandas as pd

    from d2dprompt import Detector

    mlflow.set_tracking_uri(os.environ["D2D_MLFLOW_URI"])
    run_id = detector_run(workspace)
    versions = mlflow.MlflowClient().search_model_versions("name = 'd2dprompt-sample'")
    mine = [v for v in versions if v.run_id == run_id]
    assert len(mine) == 1, [(v.version, v.run_id) for v in versions]  # registered under the evaluate stage's name
    uri = f"models:/d2dprompt-sample/{mine[0].version}"
    model = mlflow.pyfunc.load_model(uri)
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["image"]
    assert {"score", "label", "anomaly_map", "mask"} <= set(signature.outputs.input_names())
    pinned = open(mlflow.pyfunc.get_model_dependencies(uri)).read()  # requirements.txt, as `mlflow models serve` installs it
    assert "torch==" in pinned and "diffusers==" in pinned and "+cpu" not in pinned

    with (workspace / "stages/evaluate-trained/sample/scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    rows = [rows[0], next(r for r in rows if r["label"] == "1")]
    images = [(workspace / "stages/download/sample" / r["image_path"]).read_bytes() for r in rows]
    out = model.predict(pd.DataFrame({"image": images}))
    assert len(out) == 2
    for (_, got), row in zip(out.iterrows(), rows):
        assert abs(got["score"] - float(row["score"])) < 1e-5, (got["score"], row["score"])
        assert np.asarray(got["anomaly_map"]).shape == (128, 128)  # evaluate.map_size of the params it was trained with
        assert got["label"] == int(got["score"] >= got["image_threshold"]) == int(row["predicted"])  # evaluate's decision
        assert "F1-max on the validation split" in got["threshold_source"]  # evaluate's thresholds, not evaluate.sensitivity
        assert (got["normalized_score"] >= 0.5) == bool(got["label"]) and 0.0 <= got["normalized_score"] <= 1.0

    # thresholds passed at predict time re-decide label and mask
    score = float(out.loc[1, "score"])
    above = model.predict(pd.DataFrame({"image": images[1:]}), params={"image_threshold": score + 1e-3, "pixel_threshold": 2.0})
    assert above.loc[0, "label"] == 0 and not np.asarray(above.loc[0, "mask"]).any()
    assert above.loc[0, "threshold_source"] == "chosen by hand"
    below = model.predict(pd.DataFrame({"image": images[1:]}), params={"image_threshold": score - 1e-3, "pixel_threshold": -1.0})
    assert below.loc[0, "label"] == 1 and np.asarray(below.loc[0, "mask"]).all()

    # the Python API reads the same model from its URI
    assert abs(Detector.load(uri).predict(images[1]).score - score) < 1e-6


def test_the_model_code_types_its_predict_so_mlflow_does_not_warn():
    """MLflow warns "Add type hints to the `predict` method" for an untyped pyfunc; the model code carries them."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import d2dprompt.serve.mlflow_model\n"
            "print([str(w.message) for w in caught if 'type hint' in str(w.message).lower()])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.stdout.strip() == "[]"
