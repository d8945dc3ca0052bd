"""A fresh clone's `dvc repro` lands on the committed dvc.lock and metrics (README "Reproducibility").

One session run stands for the hardest case a user brings: a machine that asks for other CPU kernels (PyTorch's
scalar ones, MKL's compatible path, 1 thread), killed with SIGTERM in the middle of train@d2dprompt and started
again. It must leave every stage's outputs, dvc.lock and metrics/ byte-identical to the committed ones; then
`dvc status` must be clean with and without bytecode written, and a fresh clone that pulls from a DVC remote must
have nothing left to run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

# what an unpinned run would pick on other machines: each changes the stored latents on its own
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "OPENBLAS_CORETYPE": "Prescott", "FAISS_OPT_LEVEL": "generic",
                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CHECKPOINT = Path("stages/checkpoints/train/d2dprompt/state.json")
UP_TO_DATE = "Data and pipelines are up to date."


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT / "src"), **extra}


def run(args: list[str], cwd: Path, **extra: str) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env(**extra), timeout=1800)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def epochs_done(repo: Path) -> int:
    try:
        return len(json.loads((repo / CHECKPOINT).read_text()).get("history", []))
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0


def committed_outputs() -> dict[str, bytes]:
    files = [ROOT / "dvc.lock", *sorted((ROOT / "metrics").rglob("*.json")), *sorted((ROOT / "metrics").rglob("*.md"))]
    return {f.relative_to(ROOT).as_posix(): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def reproduced(repo_copy, tmp_path_factory) -> tuple[Path, str]:
    """A clone of the repository (no outputs) after `dvc repro` on other kernels, killed during train@d2dprompt
    once 3 epochs are checkpointed, and `dvc repro` again; with what the second run printed."""
    repo = tmp_path_factory.mktemp("reproduced") / "d2dprompt"
    run(["git", "clone", "-q", str(repo_copy), str(repo)], repo.parent)
    log = (repo.parent / "first-run.log").open("w")
    first = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env(**OTHER_KERNELS), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # its own process group: the signal reaches torchrun's worker too
    deadline = time.monotonic() + 1200
    while epochs_done(repo) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"dvc repro ended before it could be killed:\n{(repo.parent / 'first-run.log').read_text()[-3000:]}"
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=120)
    assert 3 <= epochs_done(repo) < 15, "the checkpoint of the killed run is not there to resume from"
    second = run(["dvc", "repro"], repo, **OTHER_KERNELS)
    return repo, second


def test_a_killed_repro_on_other_kernels_resumes_and_lands_on_the_committed_lock_and_metrics(reproduced):
    repo, second = reproduced
    assert "resuming after epoch" in second, f"the second run trained from scratch:\n{second[-2000:]}"
    for name, committed in committed_outputs().items():
        assert (repo / name).read_bytes() == committed, f"{name} differs from the committed file"
    record = json.loads((repo / "metrics/d2dprompt/sample.json").read_text())["numerics"]
    assert record["aten_kernels"] == "AVX2" and record["threads"] == "2" and record["cpu"] == "portable"


def test_dvc_status_is_clean_with_and_without_bytecode(reproduced):
    repo, _ = reproduced
    assert UP_TO_DATE in run(["dvc", "status"], repo, PYTHONDONTWRITEBYTECODE="1")
    run([sys.executable, "-m", "compileall", "-q", "src"], repo)  # what importing the clone's own code leaves
    assert list((repo / "src/d2dprompt/core").rglob("*.pyc")), "compileall wrote no bytecode"
    assert UP_TO_DATE in run(["dvc", "status"], repo)


def test_native_kernels_are_an_explicit_choice_and_a_typo_is_refused(repo_copy):
    wrong = subprocess.run([sys.executable, "-m", "d2dprompt.pipeline.latents", "--help"], cwd=repo_copy, capture_output=True,
                           text=True, env=env(D2D_CPU="fast"))
    assert wrong.returncode != 0 and wrong.stderr.strip().splitlines() == ["error: D2D_CPU='fast': must be one of portable, native"]


def test_a_fresh_clone_that_pulls_from_a_remote_has_nothing_to_run(reproduced, tmp_path):
    repo, _ = reproduced
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "team", str(remote)], repo)
    run(["dvc", "push"], repo)
    run(["git", "add", "-A"], repo)  # .dvc/config, and metrics/ as the repository commits them (the copy had none)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "remote"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert UP_TO_DATE in run(["dvc", "status"], clone)
    again = run(["dvc", "repro"], clone)
    assert "Running stage" not in again, again[-2000:]
    assert run(["git", "status", "--porcelain"], clone).strip() == ""


def test_make_restore_after_an_experiment_with_another_method_leaves_git_and_dvc_clean(reproduced, tmp_path):
    """The README puts the workspace back after every `dvc exp run` with `make restore`. `git checkout params.yaml &&
    dvc repro` did not: DVC had staged the experiment's dvc.lock, and patchknn's outputs were left in stages/evaluate,
    which compare hashes whole, so compare reran and `git status` showed dvc.lock and metrics/patchknn/."""
    repo = tmp_path / "d2dprompt"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    run(["dvc", "exp", "run", "-n", "with-patchknn", "-S", "methods=[d2dprompt,patchknn]"], repo)
    assert (repo / "metrics/patchknn/sample.json").is_file() and run(["git", "status", "--porcelain"], repo).strip()
    restored = run(["make", "restore"], repo)
    assert "removed stages/evaluate/patchknn" in restored and "removed stages/train/patchknn" in restored
    assert run(["git", "status", "--porcelain"], repo).strip() == ""
    assert UP_TO_DATE in run(["dvc", "status"], repo)
    for name, committed in committed_outputs().items():
        assert (repo / name).read_bytes() == committed, f"{name} differs from the committed file"
