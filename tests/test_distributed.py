"""Several processes: distributed.py's helpers on a real 2-process gloo group, and queries, train and evaluate
run by torchrun with 2 processes on the CPU giving what one process gives.

Tolerances, measured on the sample (2 CPU cores): the 2-process query cache differs from the 1-process one
by at most one fp16 rounding step in under 1 % of its values (torchrun runs each process on one thread,
and a matmul on one thread rounds differently; on equal threads the caches are identical); prompts
trained from it differ by < 1e-6 (asserted: 1e-5) and metrics and scores of the same prompts by < 1e-6
(asserted: 1e-5).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2dprompt.methods import registry
from d2dprompt.methods.base import TrainJob
from d2dprompt.params import load_params
from d2dprompt.core.runtime.distributed import shard_range
from tests import distributed_workers
from tests.conftest import ROOT, write_params

TRAIN = {"epochs": 3, "lr": 0.002}  # the lr tells this run's MLflow record from the others'
ATTENTION = {"recache_every": 2}  # a query refresh after epoch 2: shared out over the processes too
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, cwd: Path, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """torchrun as dvc.yaml runs it (core/runtime/launch.py); the environment's MLflow store (conftest) is inherited."""
    command = [sys.executable, "-m", "d2dprompt.core.runtime.launch", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("block", [1, 4, 8])
def test_shards_cover_every_row_once_in_order_in_whole_blocks(world, block):
    for n in range(0, 30):
        parts = [shard_range(n, rank, world, block) for rank in range(world)]
        assert [i for part in parts for i in part] == list(range(n))
        assert all(part.start % block == 0 for part in parts if len(part))
        blocks = [-(-len(part) // block) for part in parts]
        assert max(blocks) - min(blocks) <= 1


def test_each_process_takes_its_own_gpu_and_the_backend_follows_the_device(monkeypatch):
    from d2dprompt.core.runtime import distributed

    assert distributed.device("cpu") == torch.device("cpu") and distributed.device("cuda:1") == torch.device("cuda:1")  # one process
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.device("cuda") == torch.device("cuda:3") and distributed.device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"model.device=cuda:1 puts every process on one GPU"):
        distributed.device("cuda:1")
    assert distributed.backend("auto", torch.device("cuda:3")) == "nccl"
    assert distributed.backend("auto", torch.device("cpu")) == "gloo" and distributed.backend("gloo", torch.device("cuda:0")) == "gloo"


def test_gather_and_sums_on_a_two_process_gloo_group():
    torch.multiprocessing.spawn(distributed_workers.collectives, args=(2, free_port()), nprocs=2)


def test_a_process_waiting_on_a_failed_one_stops_with_an_error(tmp_path):
    report = tmp_path / "rank0.txt"
    processes = torch.multiprocessing.start_processes(
        distributed_workers.one_fails, args=(2, free_port(), str(report)), nprocs=2, join=False, start_method="spawn"
    )
    for process in processes.processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes.processes] == [1, 1]
    assert report.read_text() != "gather returned"
    print(report.read_text())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, workspace, trained) -> Path:
    """queries, train and evaluate by torchrun with 2 processes, on the session's latents (conftest.workspace);
    evaluate scores the prompts conftest.trained trained and evaluated on one process."""
    ws = tmp_path_factory.mktemp("torchrun")
    (ws / "stages").mkdir()
    for name in ("download", "latents"):
        (ws / "stages" / name).symlink_to(workspace / "stages" / name)
    write_params(ws, train=TRAIN, attention=ATTENTION)
    torchrun("-m", "d2dprompt.pipeline.queries", cwd=ws)
    (ws / "train.out").write_text(torchrun("-m", "d2dprompt.pipeline.train", "--out", "trained", cwd=ws).stdout)
    torchrun("-m", "d2dprompt.pipeline.evaluate", "sample", "--trained", str(trained), "--out", "stages/evaluate", "--metrics", "metrics", cwd=ws)
    return ws


@pytest.mark.e2e
def test_queries_of_two_processes_are_those_of_one(two_processes, workspace):
    one, two = workspace / "stages/queries", two_processes / "stages/queries"
    assert (two / "keys.txt").read_text() == (one / "keys.txt").read_text()
    expected, got = load_file(one / "queries.safetensors"), load_file(two / "queries.safetensors")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(got[name].float(), value.float(), rtol=2**-10, atol=1e-4), name  # one fp16 step


@pytest.mark.e2e
def test_training_on_two_processes_gives_the_prompts_of_one(two_processes, workspace, tmp_path):
    cfg = load_params(two_processes / "params.yaml")
    job = TrainJob(workspace / "stages/latents", workspace / "stages/download", workspace / "stages/queries", tmp_path / "one", tmp_path / "ckpt")
    history = registry.get("d2dprompt").train(cfg, job)
    expected, got = load_file(tmp_path / "one/model.safetensors"), load_file(two_processes / "trained/model.safetensors")
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    print(f"prompts: max |2 processes - 1 process| = {worst:.2e}")
    assert worst < TOLERANCE
    with (two_processes / "trained/history.csv").open() as fh:
        logged = list(csv.DictReader(fh))
    assert len(logged) == len(history) == TRAIN["epochs"]
    for row, one in zip(logged, history):
        assert all(abs(float(row[name]) - value) < TOLERANCE for name, value in one.items()), (row, one)
    printed = (two_processes / "train.out").read_text()
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("epoch ")] == ["epoch 1", "epoch 2", "epoch 3"]  # rank 0 only
    assert not (two_processes / "stages/checkpoints/train/d2dprompt-queries").exists()  # kept: the prompts' final state only

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["D2D_MLFLOW_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "params.`train.lr` = '0.002' and tags.stage = 'train'")
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "loss_total")) == TRAIN["epochs"]  # one run: rank 0's


def _floats(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _floats(value, f"{path}.{key}")
    elif isinstance(tree, float):
        yield path, tree


@pytest.mark.e2e
def test_evaluate_on_two_processes_gives_the_metrics_of_one(two_processes, workspace):
    expected = json.loads((workspace / "metrics-trained/sample.json").read_text())
    got = json.loads((two_processes / "metrics/sample.json").read_text())
    got, expected = dict(_floats(got)), dict(_floats(expected))
    assert got.keys() == expected.keys()
    worst = max(abs(value - expected[key]) for key, value in got.items() if value == value)  # NaN: undefined both ways
    print(f"metrics: max |2 processes - 1 process| = {worst:.2e}")
    assert worst < TOLERANCE
    with (workspace / "stages/evaluate-trained/sample/scores.csv").open() as fh:
        one = list(csv.DictReader(fh))
    with (two_processes / "stages/evaluate/sample/scores.csv").open() as fh:
        two = list(csv.DictReader(fh))
    assert [r["image_path"] for r in two] == [r["image_path"] for r in one]  # gathered in the order of the rows
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(one, two)) < TOLERANCE


@pytest.mark.e2e
def test_an_error_on_one_process_stops_them_all_with_the_error_shown(two_processes, tmp_path):
    """Rank 1 cannot read the training rows (monkeypatched there only); rank 0, which can, goes on to wait for
    it: torchrun stops the job, non-zero, with rank 1's one-line error on the console and nothing written."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(textwrap.dedent("""
        import os
        import runpy

        import d2dprompt.core.data.latent_store

        if os.environ["RANK"] == "1":
            def unreadable(*args, **kwargs):
                raise FileNotFoundError("stages/latents/sample/latents.safetensors: cannot be read here")

            d2dprompt.core.data.latent_store.training_set = unreadable
        runpy.run_module("d2dprompt.pipeline.queries", run_name="__main__", alter_sys=True)
    """))
    start = time.monotonic()
    proc = torchrun(str(script), "--out", "stages/queries-failed", cwd=two_processes, check=False)
    assert proc.returncode != 0
    assert "error: stages/latents/sample/latents.safetensors: cannot be read here" in proc.stderr
    assert "Root Cause" not in proc.stderr and "Traceback" not in proc.stderr and "SIGTERM" not in proc.stderr, proc.stderr  # one line
    assert time.monotonic() - start < 120  # not the process group's timeout (distributed.timeout_s: 1800)
    assert not (two_processes / "stages/queries-failed").exists()


@pytest.mark.e2e
def test_a_killed_two_process_training_resumes_to_the_same_prompts(two_processes, tmp_path):
    """Rank 0 dies right after writing the epoch-2 checkpoint (before the query refresh of epoch 3); torchrun
    stops the job. The same command again: every process reads the checkpoint and the prompts come out as the
    uninterrupted 2-process run's."""
    script = tmp_path / "die_after_epoch_2.py"
    script.write_text(textwrap.dedent("""
        import os
        import runpy

        import d2dprompt.core.runtime.checkpoints

        real = d2dprompt.core.runtime.checkpoints.save_state

        def save_then_die(state, path):
            real(state, path)
            if len(state.history) == 2:
                os._exit(9)

        d2dprompt.core.runtime.checkpoints.save_state = save_then_die
        runpy.run_module("d2dprompt.pipeline.train", run_name="__main__", alter_sys=True)
    """))
    args = ["--out", "resumed", "--checkpoint", "stages/checkpoints/resumed"]
    killed = torchrun(str(script), *args, cwd=two_processes, check=False)
    assert killed.returncode != 0 and (two_processes / "stages/checkpoints/resumed").is_dir()
    assert not (two_processes / "resumed/model.safetensors").exists()
    resumed = torchrun("-m", "d2dprompt.pipeline.train", *args, cwd=two_processes)
    assert "resuming after epoch 2" in resumed.stdout
    got, expected = load_file(two_processes / "resumed/model.safetensors"), load_file(two_processes / "trained/model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.e2e
def test_predict_on_two_processes_gives_the_lines_and_masks_of_one(two_processes, trained):
    """Each process predicts every other image of the folder; rank 0 writes predictions.jsonl in folder order."""
    folder, thresholds = ROOT / "sample" / "weave" / "test", trained.parent / "stages/evaluate-trained/sample/thresholds.json"
    args = [str(folder), "--trained", str(trained), "--thresholds", str(thresholds), "--workers", "1"]
    two = torchrun("-m", "d2dprompt.pipeline.predict", *args, "--out", "two", cwd=two_processes)
    one = subprocess.run([sys.executable, "-m", "d2dprompt.pipeline.predict", *args, "--out", "one"], cwd=two_processes,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert one.returncode == 0, one.stderr[-3000:]
    lines = {name: [json.loads(line) for line in (two_processes / name / "predictions.jsonl").read_text().splitlines()]
             for name in ("one", "two")}
    assert len(lines["two"]) == len(list(folder.rglob("*.png"))) == 17
    assert [r["key"] for r in lines["two"]] == [r["key"] for r in lines["one"]] == sorted(r["key"] for r in lines["one"])
    assert max(abs(a["score"] - b["score"]) for a, b in zip(lines["one"], lines["two"])) < TOLERANCE
    assert [r["label"] for r in lines["two"]] == [r["label"] for r in lines["one"]]
    for a, b in zip(lines["one"], lines["two"]):
        mask_a, mask_b = two_processes / a["mask"], two_processes / b["mask"]  # relative to where predict ran
        assert (mask_a.name, mask_a.read_bytes()) == (mask_b.name, mask_b.read_bytes())
    assert not list((two_processes / "two").glob("predictions.partial-*"))
    assert two.stdout.count("17 of 17 images") == 1  # rank 0 speaks for the job


def test_methods_that_train_on_one_process_say_so(tmp_path, monkeypatch):
    """Under torchrun (its WORLD_SIZE) train@draem stops in one line before it joins a group or writes anything."""
    from typer.testing import CliRunner

    from d2dprompt.core.runtime.cli import app_for
    from d2dprompt.pipeline import train

    params = write_params(tmp_path)
    params.write_text(params.read_text() + "methods: [d2dprompt, draem]\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app_for(train.main, train.__doc__), ["--method", "draem", "--params", str(params)])
    assert result.exit_code == 1
    assert "error: train@draem: only d2dprompt and d2d train on several processes; train draem on one" in result.output
    assert not (tmp_path / "stages").exists()
