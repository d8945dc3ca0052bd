"""Every tool's --help: its module docstring's summary, and no torch, diffusers or MLflow imported to print it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from d2dprompt.core.runtime.cli import summary
from tests.conftest import ROOT

TOOLS = [*(f"pipeline.{s}" for s in ("download", "latents", "queries", "train", "evaluate", "predict", "ablate")), "serve.app", "bench.predict", "bench.scale"]
HEAVY = ("torch", "diffusers", "transformers", "mlflow", "dvc", "gradio")


@pytest.mark.parametrize("tool", TOOLS)
def test_help_shows_the_docstring_summary_without_loading_models(tool):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", f"d2dprompt.{tool}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    first_words = " ".join(summary(importlib.import_module(f"d2dprompt.{tool}").__doc__).split()[:6])
    assert first_words in " ".join(proc.stdout.replace("│", " ").split()), (first_words, proc.stdout[:800])


def test_summary_is_the_paragraph_after_the_usage_line_with_brackets_kept():
    doc = "python -m x [--a A]\n\nDoes [this] and\nthat.\n\nMore."
    assert summary(doc) == "Does \\[this] and that."
