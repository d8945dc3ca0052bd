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


def test_a_refused_value_under_the_stages_launcher_is_one_line(tmp_path):
    """dvc.yaml runs queries, train and evaluate under torchrun; a params value the stage refuses printed its one line
    and then ~30 lines of torchrun's failure report. Under the launcher dvc.yaml uses, stderr is that one line."""
    import yaml

    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    launched = [stage["cmd"] if "cmd" in stage else stage["do"]["cmd"] for stage in dvc_yaml.values()]
    assert not any(cmd.startswith("torchrun") for cmd in launched)
    assert sum(cmd.startswith("python -m d2dprompt.core.runtime.launch --standalone") for cmd in launched) == 3
    (tmp_path / "params.yaml").write_text("loss:\n  focal: -1\n")
    proc = subprocess.run([sys.executable, "-m", "d2dprompt.core.runtime.launch", "--standalone", "--nproc_per_node=1", "-m",
                           "d2dprompt.pipeline.train", "--params", "params.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: params.yaml: loss.focal: must be >= 0, got -1"], proc.stderr


def test_a_worker_that_did_not_explain_itself_gets_one_line_naming_its_rank_and_signal():
    from types import SimpleNamespace

    from d2dprompt.core.runtime.launch import failure_lines

    assert failure_lines({0: SimpleNamespace(exitcode=-15, pid=10), 1: SimpleNamespace(exitcode=1, pid=11)}) == []  # rank 1 said why
    lines = failure_lines({1: SimpleNamespace(exitcode=-9, pid=11), 2: SimpleNamespace(exitcode=3, pid=12)})
    assert lines == ["error: rank 1 (pid 11) failed with signal SIGKILL; rerun with distributed.nproc=1 to see its traceback",
                     "error: rank 2 (pid 12) failed with exit code 3; rerun with distributed.nproc=1 to see its traceback"]
