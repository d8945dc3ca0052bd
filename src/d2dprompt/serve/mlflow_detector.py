"""Logs a trained folder as the MLflow model `detector` (the pyfunc of mlflow_model.py) into an evaluate run, with
the thresholds that run fitted, and registers it as `<method>-<dataset>` (the evaluate stage's own name): its
signature, the pip requirements it needs, the d2dprompt code it runs. Called by pipeline/evaluate.py."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any


def requirements() -> list[str]:
    """The installed versions of d2dprompt's base dependencies and of its `train` extra, which the model runs with
    (torch without its +cpu/+cu local tag)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    pinned = []
    for line in requires("d2dprompt") or []:
        if "extra ==" in line and not re.search(r"""extra == ["']train["']""", line):
            continue
        line = line.split(";")[0].strip()
        name = re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(line)
    return [*pinned, f"mlflow=={version('mlflow')}", f"pandas=={version('pandas')}"]


def detector_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec("double", "score"), ColSpec("double", "normalized_score"), ColSpec("long", "label"), ColSpec("double", "image_threshold"),
               ColSpec("double", "pixel_threshold"), ColSpec("string", "threshold_source"),
               ColSpec(Array(Array("float")), "anomaly_map"), ColSpec(Array(Array("boolean")), "mask")]
    params = [ParamSpec("image_threshold", "double", None), ParamSpec("pixel_threshold", "double", None), ParamSpec("category", "string", None)]
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs), params=ParamSchema(params))


def log_detector(client: Any, run_id: str, trained: Path, params: Path, thresholds: Path, registered_name: str) -> None:
    import mlflow

    from d2dprompt.serve import mlflow_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per copied file otherwise
    mlflow.set_tracking_uri(client.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature is explicit; an input example would copy an image file into every logged model
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        package = Path(__file__).resolve().parents[1]  # the d2dprompt package: serve/ is one level down
        code = shutil.copytree(package, Path(tmp) / "d2dprompt", ignore=shutil.ignore_patterns("__pycache__"))
        mlflow.pyfunc.log_model(
            name="detector",
            python_model=mlflow_model.__file__,
            artifacts={"trained": str(trained), "params": str(params), "thresholds": str(thresholds)},
            code_paths=[str(code)],
            signature=detector_signature(),
            pip_requirements=requirements(),
            registered_model_name=registered_name,
        )
