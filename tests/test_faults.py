"""Faults leave no debris: a stage killed with SIGKILL leaves temps and a RUNNING MLflow run that its
next run cleans up, without touching what a live concurrent process is doing."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import d2dprompt
from d2dprompt.core.runtime import outputs, tracking
from d2dprompt.pipeline import download

SRC = Path(d2dprompt.__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parents[1] / "sample"
READY_TIMEOUT_S = 120  # importing MLflow and creating a store's schema take seconds on a loaded machine

# A stand-in for a stage: its MLflow run and one atomic output, then either finish or hang until killed.
STAGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from d2dprompt.core.runtime.outputs import atomic_dir, atomic_file
    from d2dprompt.core.runtime.tracking import start_run

    kind, dest, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    with start_run("fault-" + kind, {}) as run:
        with (atomic_dir if kind == "dir" else atomic_file)(dest) as tmp:
            (tmp / "data.txt" if kind == "dir" else tmp).write_text(mode)
            print(run.run_id, flush=True)
            if mode == "hang":
                time.sleep(600)
    """
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('faults-store') / 'mlflow.db'}"


def start_stage(script: Path, kind: str, dest: Path, mode: str, store: str) -> tuple[subprocess.Popen, str]:
    """Start the stand-in stage; returns it and its run id once it sits inside its atomic output."""
    env = {**os.environ, tracking.URI_ENV: store, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, str(script), kind, str(dest), mode], cwd=script.parent, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        proc.kill()
        raise AssertionError(f"stand-in stage did not start: {proc.communicate()[1][-2000:]}")
    return proc, line


def run_stage(script: Path, kind: str, dest: Path, store: str) -> str:
    proc, run_id = start_stage(script, kind, dest, "finish", store)
    _, err = proc.communicate(timeout=READY_TIMEOUT_S)
    assert proc.returncode == 0, err
    return run_id


def temps_of(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def status(store: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store).get_run(run_id).info.status


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_sigkill_mid_stage_is_cleaned_up_by_the_next_run(kind, store, tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    dest = tmp_path / "stages" / ("latents" if kind == "dir" else "metrics.json")

    killed, killed_run = start_stage(script, kind, dest, "hang", store)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert len(temps_of(dest)) == 1 and status(store, killed_run) == "RUNNING"  # the debris this is about

    next_run = run_stage(script, kind, dest, store)
    assert status(store, killed_run) == "KILLED"
    assert status(store, next_run) == "FINISHED"
    assert temps_of(dest) == []
    assert (dest / "data.txt" if kind == "dir" else dest).read_text() == "finish"


def test_a_live_concurrent_run_and_its_temp_are_left_alone(store, tmp_path):
    """A parallel worker of the same stage is still running: neither its run nor its temp may go."""
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    dest = tmp_path / "stages" / "latents"
    live, live_run = start_stage(script, "dir", dest, "hang", store)
    try:
        run_stage(script, "dir", dest, store)
        assert status(store, live_run) == "RUNNING"
        assert len(temps_of(dest)) == 1 and live.poll() is None
    finally:
        live.kill()
        live.communicate()


def test_process_gone_is_sure_or_says_no():
    here = tracking.process_tags()
    me = dict(here)
    assert not tracking.process_gone(me, here)  # this process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert tracking.process_gone({**here, "pid": str(dead.pid)}, here)
    assert not tracking.process_gone({**here, "pid": str(dead.pid), "host": "elsewhere"}, here)
    assert not tracking.process_gone({**here, "pid": str(dead.pid), "pid_namespace": "pid:[1]"}, here)
    assert not tracking.process_gone({"host": here["host"]}, here)  # a run logged before pids were
    if here["boot_id"]:
        assert tracking.process_gone({**here, "boot_id": "another boot"}, here)


def test_leftovers_of_older_temp_names_and_old_folders_are_removed(tmp_path):
    dest = tmp_path / "latents"
    (tmp_path / ".latents.k2j4x9_a").mkdir()  # atomic_dir's temp before temps carried a pid
    (tmp_path / ".latents.old").mkdir()  # killed between the two renames of a swap
    (tmp_path / ".queries.99999999-abcdefgh").mkdir()  # a temp of a process that is gone
    alive = tmp_path / f".queries.{os.getppid()}-abcdefgh"
    alive.mkdir()  # a temp of a live process (the test runner's parent)
    unrelated = tmp_path / ".gitignore"
    unrelated.write_text("x\n")
    with outputs.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".gitignore", alive.name, "latents"])


def test_download_scratch_of_a_killed_run_is_removed(tmp_path):
    """download.py's own scratch folder (`<out>/.tmp-*`): a SIGKILLed run's copy goes with the next run."""
    out = tmp_path / "out"
    script = tmp_path / "download_stage.py"
    script.write_text(
        "import sys, time\nfrom pathlib import Path\nfrom d2dprompt.pipeline.download import _scratch_dir\n"
        "with _scratch_dir(Path(sys.argv[1]), 'sample') as scratch:\n"
        "    (scratch / 'half.png').write_bytes(b'x')\n    print(scratch, flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    assert ready and Path(proc.stdout.readline().strip()).is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert [p.name[:12] for p in out.iterdir()] == [".tmp-sample-"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"download": {"folders": {"sample": str(SAMPLE)}, "categories": ["disc"]}}))
    result = CliRunner().invoke(download.app, ["--params", str(params), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["sample"]
