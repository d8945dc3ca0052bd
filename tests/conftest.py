"""Shared fixtures: the tiny SD stack is built once per session (it is a pure function of its seed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from d2dprompt.core.models import FrozenSD, build_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny() -> FrozenSD:
    return build_tiny(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_mlflow(tmp_path_factory):
    """Runs logged by tests go to a throwaway store, never the repository's mlflow.db.

    Session-scoped, so stage CLIs run by module- or session-scoped fixtures are isolated too.
    """
    store = tmp_path_factory.getbasetemp() / "mlflow"
    store.mkdir(exist_ok=True)
    previous = os.environ.get("D2D_MLFLOW_URI")
    os.environ["D2D_MLFLOW_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    yield
    if previous is None:
        os.environ.pop("D2D_MLFLOW_URI", None)
    else:
        os.environ["D2D_MLFLOW_URI"] = previous


def run_cmd(args: list[str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run a command with the test's Python environment first on PATH; fail with its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def repo_copy(tmp_path_factory) -> Path:
    """The repository as a user clones it (tracked and not-ignored files, one commit), without outputs.

    For tests that run `dvc exp run` / `dvc metrics show` exactly as the README shows them.
    """
    dest = tmp_path_factory.mktemp("repo") / "d2dprompt"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    for name in ("stages", "metrics"):  # outputs: what a run writes must come from that run
        shutil.rmtree(dest / name, ignore_errors=True)
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        run_cmd(args, dest)
    return dest


def stage(name: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", f"d2dprompt.pipeline.{name}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def write_params(folder: Path, **blocks) -> Path:
    params = {
        "download": {"folders": {"sample": str(ROOT / "sample")}},
        "attention": {"mode": "cached", "prompts": "joint"},
        # 5 normal test images per category at 128 px reach FPR 1e-4 but not AUPIMO's default 1e-5; 200 resamples suffice here
        "evaluate": {"map_size": 128, "grid_cases": 1, "aupimo_fpr": [1.0e-4, 1.0e-3], "bootstrap": 200},
    }
    for block, values in blocks.items():
        params.setdefault(block, {}).update(values)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """The real stage CLIs on the bundled sample: download + latents + queries once per session; tests train and
    evaluate on top (test_pipeline.py, test_detector.py, test_mlflow_model.py, test_app.py)."""
    ws = tmp_path_factory.mktemp("pipeline")
    write_params(ws)
    stage("download", cwd=ws)
    stage("latents", cwd=ws)
    stage("queries", cwd=ws)
    return ws


def pixel_auroc(ws: Path, out: str, metrics: str) -> dict:
    stage("evaluate", "sample", "--trained", out, "--out", f"stages/evaluate-{out}", "--metrics", metrics, cwd=ws)
    return json.loads((ws / metrics / "sample.json").read_text())


@pytest.fixture(scope="session")
def trained(workspace) -> Path:
    """Prompts trained 4 epochs, evaluated into metrics-trained/ and stages/evaluate-trained/."""
    write_params(workspace, train={"epochs": 4})
    stage("train", "--out", "trained", cwd=workspace)
    pixel_auroc(workspace, "trained", "metrics-trained")
    return workspace / "trained"


def sample_latents(root: Path, sd: FrozenSD, categories: list[str], latents_params, image_size: int = 64) -> Path:
    """The latents stage's output for some of the bundled sample's categories, written under `root` (as
    stages/latents/): what the method trainers read, without running the stage CLIs."""
    import torch
    from safetensors.torch import save_file

    from d2dprompt.core.data.latent_store import write_index
    from d2dprompt.core.data.manifest import scan_mvtec_layout
    from d2dprompt.pipeline.latents import encode_dataset

    rows = scan_mvtec_layout(ROOT / "sample", "sample", categories)
    tensors, index = encode_dataset(sd, ROOT / "sample", rows, image_size, latents_params, torch.device("cpu"), "latents")
    (root / "sample").mkdir()
    save_file(tensors, root / "sample" / "latents.safetensors")
    write_index(index, root / "sample" / "index.csv")
    return root


METHODS = ("d2dprompt", "d2d", "anomalyclip", "draem", "decodiff", "patchknn")  # every built-in method


@pytest.fixture(scope="session")
def every_method(repo_copy):
    """One `dvc exp run` with every method (2 epochs each: the pipeline, not the numbers, is under test)."""
    epochs = ["-S", "train.epochs=2", "-S", "draem.epochs=2", "-S", "decodiff.epochs=2"]
    run_cmd(["dvc", "exp", "run", "-S", f"methods=[{','.join(METHODS)}]", *epochs], repo_copy)
    return repo_copy


@pytest.fixture(scope="session")
def few_shot(every_method, tmp_path_factory):
    """README's few-shot command in a copy of the repository above (its DVC cache restores latents and queries):
    D2D-Prompt with a memory of 4 normal images per category beside patchknn on the same draw."""
    repo = tmp_path_factory.mktemp("fewshot") / "d2dprompt"
    shutil.copytree(every_method, repo, symlinks=True)
    run_cmd(["dvc", "exp", "run", "-S", "methods=[d2dprompt,patchknn]", "-S", "fewshot.k=4", "-S", "train.epochs=2"], repo)
    return repo
