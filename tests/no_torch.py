"""python tests/no_torch.py MODULE|SCRIPT.py [ARGS...]: run `python -m MODULE ARGS...` (or the script) as on a machine with only the base install
and the `onnx` extra: importing the training stack (torch, diffusers, transformers, safetensors) or the pipeline's (DVC,
MLflow) raises ImportError, as it would there. pyproject.toml keeps those out of the base install and `onnx`
(tests/test_export.py checks both)."""

from __future__ import annotations

import importlib.abc
import runpy
import sys

ABSENT = ("torch", "diffusers", "transformers", "safetensors", "pytorch_msssim", "dvc", "mlflow", "onnx")  # onnxruntime stays


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"No module named {name!r} (not installed with only the onnx extra)")
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, Absent())
    target, sys.argv = sys.argv[1], sys.argv[1:]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
