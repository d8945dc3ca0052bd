"""Tests for d2dprompt.core.runtime.tracking: store location, tags, params, metrics and artifacts read back from MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from d2dprompt.core.runtime import tracking

DVC_ENV = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", tracking.URI_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)
    # git must not discover a repository above tmp_path
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module: creating its schema takes seconds."""
    return tmp_path_factory.mktemp("store") / "mlflow.db"


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )
    return done.stdout.strip()


def _repo(path: Path) -> Path:
    path.mkdir(parents=True)
    _git(path, "init", "-q")
    _git(path, "commit", "-q", "--allow-empty", "-m", "init")
    return path


def test_tracking_uri_from_subdirectory_is_repo_root(tmp_path):
    repo = _repo(tmp_path / "repo")
    sub = repo / "a" / "b"
    sub.mkdir(parents=True)
    assert tracking.tracking_uri(sub) == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert tracking.tracking_uri(sub).startswith("sqlite:////")


def test_tracking_uri_from_linked_worktree_is_main_repo(tmp_path):
    repo = _repo(tmp_path / "main")
    _git(repo, "worktree", "add", "-q", str(tmp_path / "linked"))
    assert (tmp_path / "linked" / ".git").is_file()
    assert tracking.tracking_uri(tmp_path / "linked") == f"sqlite:///{repo.resolve()}/mlflow.db"


def test_tracking_uri_outside_git_falls_back_to_cwd(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert tracking.tracking_uri() == f"sqlite:///{plain.resolve()}/mlflow.db"


def test_tracking_uri_prefers_dvc_root_over_cwd(tmp_path, monkeypatch):
    # dvc exp run --temp/--queue runs in a separate git repo under .dvc/tmp/exps and sets DVC_ROOT = main repo
    repo = _repo(tmp_path / "repo")
    elsewhere = _repo(tmp_path / "elsewhere")
    monkeypatch.chdir(elsewhere)
    assert tracking.tracking_uri() == f"sqlite:///{elsewhere.resolve()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"


def test_tracking_uri_inside_dvc_experiment_copy_is_main_repo(tmp_path, monkeypatch):
    repo = _repo(tmp_path / "repo")
    copy = _repo(repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc")
    assert tracking.tracking_uri(copy) == f"sqlite:///{repo.resolve()}/mlflow.db"


def test_tracking_uri_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(tracking.URI_ENV, "http://tracking.example:5000")
    assert tracking.tracking_uri(tmp_path) == "http://tracking.example:5000"
    assert tracking.artifact_location("http://tracking.example:5000") is None
    assert tracking.artifact_location("sqlite:////data/x/mlflow.db") == "file:///data/x/mlartifacts"


def test_run_tags_in_and_outside_git(tmp_path, monkeypatch):
    repo = _repo(tmp_path / "repo")
    head = _git(repo, "rev-parse", "HEAD")
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-oak")
    tags = tracking.run_tags("train", cwd=repo)
    assert tags == {
        "git_commit": head,
        "dvc_exp_name": "sunny-oak",
        "stage": "train",
        "mlflow.source.git.commit": head,
    }
    monkeypatch.delenv("DVC_EXP_NAME")
    outside = tmp_path / "outside"
    outside.mkdir()
    tags = tracking.run_tags("evaluate", cwd=outside)
    assert tags["git_commit"] == "unknown" and tags["dvc_exp_name"] == "workspace"


def test_flatten_params_nests_stringifies_and_truncates():
    nested = {"train": {"betas": [0.5, 0.999], "lr": 0.001}, "texture_dir": None, "long": "x" * 7000}
    flat = tracking.flatten_params(nested)
    assert flat == {"train.betas": "[0.5, 0.999]", "train.lr": "0.001", "texture_dir": "None", "long": "x" * 6000}


def test_retry_rides_out_lock_errors_only(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda _s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking._retry(flaky) == "ok" and len(calls) == 3

    def always_locked():
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="locked"):
        tracking._retry(always_locked)
    with pytest.raises(ValueError):
        tracking._retry(lambda: (_ for _ in ()).throw(ValueError("other")))


def test_start_run_logs_tags_params_metrics_and_artifacts(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    monkeypatch.setenv(tracking.URI_ENV, uri)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-elm")
    repo = _repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    report = tmp_path / "report.json"
    report.write_text('{"image_AUROC": 0.9}')
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "roc.txt").write_text("roc")

    with tracking.start_run("train", {"train": {"lr": 0.001, "betas": [0.5, 0.999]}, "seed": 0}) as run:
        for step, loss in enumerate([0.9, 0.5, 0.2]):
            run.log_metrics({"loss": loss, "dice": 1 - loss}, step=step)
        run.log_artifact(report)
        run.log_artifacts(plots, artifact_path="plots")

    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run.run_id)
    assert logged.info.run_name == "train-brisk-elm" and logged.info.status == "FINISHED"
    head = _git(repo, "rev-parse", "HEAD")
    assert logged.data.tags["git_commit"] == head
    assert logged.data.tags["mlflow.source.git.commit"] == head
    assert logged.data.tags["dvc_exp_name"] == "brisk-elm" and logged.data.tags["stage"] == "train"
    assert logged.data.params == {"train.lr": "0.001", "train.betas": "[0.5, 0.999]", "seed": "0"}
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.9), (1, 0.5), (2, 0.2)]
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert artifacts == {"report.json", "plots"}
    stored = store.parent / "mlartifacts"
    assert (stored / logged.info.run_id / "artifacts" / "plots" / "roc.txt").read_text() == "roc"
    assert client.get_experiment(logged.info.experiment_id).name == "d2dprompt"


def test_start_run_marks_failed_and_reraises(store, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    monkeypatch.setenv(tracking.URI_ENV, uri)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with tracking.start_run("evaluate", {}) as run:
            1 / 0
    logged = MlflowClient(tracking_uri=uri).get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert logged.info.run_name == "evaluate-workspace" and logged.data.tags["git_commit"] == "unknown"


def test_log_artifact_names_missing_path(store, monkeypatch, tmp_path):
    monkeypatch.setenv(tracking.URI_ENV, f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'nope.json'}"):
        with tracking.start_run("train", {}) as run:
            run.log_artifact(tmp_path / "nope.json")


def test_flatten_params_of_params_dataclass_matches_config_keys():
    from d2dprompt.core.runtime.config import flatten
    from d2dprompt.params import Params

    flat = tracking.flatten_params(Params())
    assert set(flat) == set(flatten(Params()))
    assert flat["train.betas"] == "[0.5, 0.999]" and flat["latents.texture_dir"] == "None"


def test_without_mlflow_a_stage_runs_untracked_and_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what a core install without the pipeline extra has
    with tracking.start_run("train", {"a": 1}) as log:
        log.log_metrics({"loss": 1.0}, step=1)
        log.log_artifact("nothing.txt")
    assert "not tracked (pip install 'd2dprompt[pipeline]')" in capsys.readouterr().err


def test_the_stages_of_one_dvc_experiment_nest_under_one_parent_run_with_their_datasets(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    monkeypatch.setenv(tracking.URI_ENV, uri)
    monkeypatch.setenv("DVC_EXP_NAME", "quiet-oak")
    monkeypatch.chdir(_repo(tmp_path / "repo"))
    index = tmp_path / "index.csv"
    index.write_text("key,split\na.png,test\n")
    with tracking.start_run("train", {"seed": 0}) as train_run:
        train_run.log_dataset("sample", index, "training")
    with tracking.start_run("evaluate", {"seed": 0}) as evaluate_run:
        evaluate_run.log_dataset("sample", index, "evaluation")
    client = MlflowClient(tracking_uri=uri)
    runs = [client.get_run(r.run_id) for r in (train_run, evaluate_run)]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # one parent for the experiment's stages
    parent = client.get_run(parents.pop())
    assert parent.info.run_name == "quiet-oak" and parent.data.tags[tracking.PARENT_TAG] == "quiet-oak"
    for run, context in zip(runs, ("training", "evaluation")):
        (given,) = run.inputs.dataset_inputs
        assert given.dataset.name == "sample" and given.dataset.source.endswith("index.csv")
        assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", context)]
    experiment = client.get_experiment(runs[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow's GenAI pages


def test_a_parent_run_spans_its_stage_runs_and_takes_the_outcome_of_the_last(store, tmp_path, monkeypatch):
    """A killed experiment's parent run says KILLED and lasts from its first stage's start to its last stage's end,
    not FINISHED after milliseconds; a stage killed with SIGKILL counts once the next run of that stage finds it."""
    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    monkeypatch.setenv(tracking.URI_ENV, uri)
    monkeypatch.setenv("DVC_EXP_NAME", "late-fir")
    monkeypatch.chdir(_repo(tmp_path / "repo"))
    client = MlflowClient(tracking_uri=uri)
    with tracking.start_run("train", {}) as train_run:
        parent_id = client.get_run(train_run.run_id).data.tags["mlflow.parentRunId"]
        assert client.get_run(parent_id).info.status == "RUNNING"
        time.sleep(0.3)
    with pytest.raises(KeyboardInterrupt), tracking.start_run("evaluate", {}) as evaluate_run:
        time.sleep(0.3)
        raise KeyboardInterrupt
    parent, train, evaluate = (client.get_run(i).info for i in (parent_id, train_run.run_id, evaluate_run.run_id))
    assert (train.status, evaluate.status, parent.status) == ("FINISHED", "KILLED", "KILLED")
    assert parent.start_time <= train.start_time and parent.end_time == evaluate.end_time
    assert parent.end_time - parent.start_time >= 600  # both stages' time, not the milliseconds of its creation

    with tracking.start_run("evaluate", {}):  # the experiment resumed: its last stage now finished
        pass
    assert client.get_run(parent_id).info.status == "FINISHED"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = tracking.process_tags()
    experiment_id = parent.experiment_id
    orphan = client.create_run(experiment_id, tags={**here, "pid": str(dead.pid), "stage": "predict", "mlflow.parentRunId": parent_id})
    client.log_metric(orphan.info.run_id, "loss", 1.0)
    tracking.refresh_parent(client, experiment_id, parent_id)
    assert client.get_run(parent_id).info.status == "RUNNING"  # until its process is known to be gone
    assert tracking.close_killed_runs(client, experiment_id, "predict", here) == [orphan.info.run_id]
    killed = client.get_run(orphan.info.run_id).info
    assert killed.status == "KILLED" and killed.end_time == client.get_metric_history(orphan.info.run_id, "loss")[0].timestamp
    assert client.get_run(parent_id).info.status == "KILLED"


def test_the_experiment_opens_on_the_classic_runs_table_not_the_genai_evaluation_view(store, tmp_path, monkeypatch):
    """Left to infer its kind, MLflow's UI filed evaluate runs (dataset inputs tagged "evaluation") under the GenAI
    view's "Evaluation runs" unless the URL said workflowType=machine_learning. The experiment states its kind, also
    one made before the tag existed."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    monkeypatch.setenv(tracking.URI_ENV, uri)
    monkeypatch.chdir(_repo(tmp_path / "repo"))
    client = MlflowClient(tracking_uri=uri)
    older = client.create_experiment("older", artifact_location=str(tmp_path / "art"))
    for name in ("older", "fresh"):
        tracking._experiment_id(client, name, str(tmp_path / "art"))
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
