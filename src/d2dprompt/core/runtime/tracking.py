"""MLflow logging for the DVC stages: one SQLite store per repository, one run per stage call.

    with start_run("train", flatten(params)) as run:
        run.log_metrics({"loss": 0.3}, step=epoch)
        run.log_artifact("stages/train/config.json")

Where runs go (first match wins):
1. `D2D_MLFLOW_URI` (any MLflow tracking URI, e.g. a tracking server);
2. `sqlite:////<main repo>/mlflow.db`, artifacts in `<main repo>/mlartifacts/`.
   The main repository is found from `start`, else `DVC_ROOT` (DVC sets it to
   the parent repository even for `dvc exp run --temp/--queue`, whose copies in
   `.dvc/tmp/exps/tmp*` are separate git repositories), else the working
   directory: the parent of git's common dir, so linked worktrees share the
   main repository's store. A path inside `.dvc/tmp/exps/` is mapped to the
   repository above it. Outside git, the directory itself is used.

The SQLite file store is used because MLflow 3 refuses `./mlruns` without
MLFLOW_ALLOW_FILE_STORE. Parallel queue workers share one SQLite file: opening
a new store is serialised with a file lock (MLflow's schema migrations race
otherwise), and every store call is retried with backoff on "database is locked".
MLflow is imported inside functions: importing it takes over a second.

A stage killed with SIGKILL cannot close its run. Each run therefore records the process behind it
(tags `pid`, `host`, `boot_id`, `pid_namespace`), and the next run of the same stage marks the runs
of that stage still RUNNING as KILLED when their process is gone: same host and pid namespace and no
such pid any more, or the machine has rebooted since. A run of a live process (a parallel
`dvc exp run --queue` worker) or of another machine is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import importlib
import logging
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from d2dprompt.core.runtime.outputs import process_alive

URI_ENV = "D2D_MLFLOW_URI"  # overrides the repository's SQLite store (tests, tracking servers)
DB_NAME = "mlflow.db"
MLFLOW_PARENT = "mlflow.parentRunId"  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID, without importing mlflow
# MLflow's UI opens an experiment of this kind on its classic runs table (metric columns, charts); left to infer it,
# it files runs with "evaluation" dataset inputs under the GenAI view's "Evaluation runs"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARENT_TAG = "d2d_group"  # on the parent run of one DVC experiment's (or one commit's workspace) stage runs
ARTIFACT_DIR = "mlartifacts"
DEFAULT_EXPERIMENT = "d2dprompt"
LOCK_RETRIES = 8  # backoff 0.1 s doubling to 3 s: rides out ~20 s of contention from parallel queue workers
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
GIT_TIMEOUT_S = 10  # a git call that hangs (network filesystem) must not hang a stage

_log = logging.getLogger(__name__)


def _git(args: list[str], cwd: Path) -> str | None:
    """stdout of `git <args>` in `cwd`, or None outside a repository / without git."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def repository_root(start: Path | None = None) -> Path:
    """Absolute root of the main repository holding `start` (default: DVC_ROOT, else cwd).

    Outside git, `start` itself is returned.
    """
    if start is None:
        start = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    start = Path(start).resolve()
    parts = start.parts
    for i in range(len(parts) - 3):
        if parts[i + 1 : i + 4] == (".dvc", "tmp", "exps"):  # inside a DVC experiment copy without DVC_ROOT
            start = Path(*parts[: i + 1])
            break
    common = _git(["rev-parse", "--path-format=absolute", "--git-common-dir"], start)
    if common is None:
        return start
    common_dir = Path(common)
    if common_dir.name == ".git":
        return common_dir.parent
    # submodule (common dir under .git/modules) or bare repository: use the work tree itself
    toplevel = _git(["rev-parse", "--show-toplevel"], start)
    return Path(toplevel) if toplevel else start


def tracking_uri(start: Path | None = None) -> str:
    """MLflow tracking URI for this project: `D2D_MLFLOW_URI`, else `sqlite:////<main repo>/mlflow.db`."""
    override = os.environ.get(URI_ENV)
    if override:
        return override
    return f"sqlite:///{(repository_root(start) / DB_NAME).as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return Path(uri[len(prefix) :]).resolve()


def artifact_location(uri: str) -> str | None:
    """`file://` URI of the artifact folder next to a SQLite store; None lets any other store decide."""
    db_path = _sqlite_path(uri)
    return (db_path.parent / ARTIFACT_DIR).as_uri() if db_path else None


@contextlib.contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across processes: MLflow's schema migrations race on a new file."""
    from filelock import FileLock

    db_path = _sqlite_path(uri)
    if db_path is None:
        yield
        return
    lock_dir = db_path.parent / ARTIFACT_DIR  # git-ignored, unlike a lock file beside mlflow.db
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_dir / ".store-init.lock"):
        yield


def run_tags(stage: str, cwd: Path | None = None) -> dict[str, str]:
    """Tags that tie a run to code and experiment: git commit, DVC experiment name, stage."""
    commit = _git(["rev-parse", "HEAD"], Path(cwd) if cwd else Path.cwd()) or "unknown"
    tags = {
        "git_commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
        "stage": stage,
        "mlflow.source.git.commit": commit,
    }
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        tags["dvc_exp_baseline_rev"] = baseline
    return tags


def _as_mapping(value: Any) -> Any:
    """A dataclass or pydantic model (config.Params) as a dict; anything else unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings / dataclasses / pydantic models -> {'a.b': str(value)}, values cut to MLflow's length limit."""
    params = _as_mapping(params)
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        value = _as_mapping(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def _is_lock_error(error: BaseException) -> bool:
    return "database is locked" in str(error) or "database table is locked" in str(error)


def _retry(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a store call, retrying SQLite lock errors with jittered exponential backoff (ten lines, tested;
    a retry library would be one more dependency for this one use)."""
    for attempt in range(LOCK_RETRIES + 1):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if attempt == LOCK_RETRIES or not _is_lock_error(error):
                raise
            delay = min(3.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.5)
            _log.warning("mlflow store locked, retrying in %.1f s (%d/%d)", delay, attempt + 1, LOCK_RETRIES)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _quiet_mlflow() -> None:
    """Hide the schema-migration chatter MLflow prints when it opens a new SQLite store."""
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RunLogger:
    """Logs to one open MLflow run; every call is retried on SQLite lock errors."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [Metric(str(key), float(value), timestamp, int(step or 0)) for key, value in metrics.items()]
        if batch:
            _retry(self.client.log_batch, self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(key, value) for key, value in flatten_params(params).items()]
        if batch:
            _retry(self.client.log_batch, self.run_id, params=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            _retry(self.client.log_batch, self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: artifact file not found")
        _retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory}: artifact folder not found")
        _retry(self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def log_dataset(self, name: str, index: str | Path, context: str) -> None:
        """A dataset this run read, as an MLflow dataset input: its name, the index file listing its rows
        (the latents stage's index.csv) as source, and that file's digest, so two runs show whether they saw
        the same rows. `context` is MLflow's input tag: training or evaluation."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        index = Path(index)
        digest = hashlib.sha256(index.read_bytes()).hexdigest()[:16] if index.is_file() else "missing"
        dataset = Dataset(name=name, digest=digest, source_type="local", source=str(index.resolve()))
        _retry(self.client.log_inputs, self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


    def retry(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call(*args, **kwargs)`, retried on SQLite lock errors as every logging call here (the train stage logs the
        MLflow model `detector` through it)."""
        return _retry(call, *args, **kwargs)


class UntrackedRun:
    """RunLogger's interface doing nothing: the stage's own outputs are the record."""

    run_id = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, name: str, index: str | Path, context: str) -> None:
        pass


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def process_tags() -> dict[str, str]:
    """What tells later runs whether this process still lives: pid, host, boot and pid namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # containers sharing a hostname differ here
    except OSError:
        namespace = ""
    return {
        "pid": str(os.getpid()),
        "host": socket.gethostname(),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": namespace,
    }


def process_gone(tags: Mapping[str, str], here: Mapping[str, str]) -> bool:
    """True only when the process that logged `tags` is certainly dead; unknown counts as alive."""
    if tags.get("host") != here["host"] or not tags.get("pid", "").isdigit():
        return False  # another machine (or a run logged before pids were recorded): cannot tell
    if here["boot_id"] and tags.get("boot_id") and tags["boot_id"] != here["boot_id"]:
        return True  # rebooted since: every process of that boot is gone
    if tags.get("pid_namespace", "") != here["pid_namespace"]:
        return False
    return not process_alive(int(tags["pid"]))


def close_killed_runs(client: Any, experiment_id: str, stage: str, here: Mapping[str, str]) -> list[str]:
    """Mark RUNNING runs of `stage` whose process is gone as KILLED; returns their run ids."""
    query = f"tags.stage = '{stage}' and attributes.status = 'RUNNING'"  # stage names are code constants
    closed = []
    for run in _retry(client.search_runs, [experiment_id], filter_string=query, max_results=1000):
        if process_gone(run.data.tags, here):
            _retry(client.set_terminated, run.info.run_id, "KILLED", end_time=_last_activity(client, run))
            _log.warning(
                "mlflow run %s (%s) marked KILLED: its process %s on %s is gone",
                run.info.run_name, run.info.run_id, run.data.tags.get("pid"), run.data.tags.get("host"),
            )
            closed.append(run.info.run_id)
            if MLFLOW_PARENT in run.data.tags:
                refresh_parent(client, experiment_id, run.data.tags[MLFLOW_PARENT])
    return closed


def _last_activity(client: Any, run: Any) -> int:
    """When a killed run last logged a metric (ms), else its start: its end, as near as the store can tell."""
    times = [m.timestamp for key in run.data.metrics for m in _retry(client.get_metric_history, run.info.run_id, key)]
    return max(times, default=run.info.start_time)


def refresh_parent(client: Any, experiment_id: str, parent_id: str) -> None:
    """Give a parent run its stage runs' span and outcome: RUNNING while one of them runs, else the status of the
    one that started last (DVC stops an experiment at its first failing stage) and the latest end among them."""
    query = f"tags.`{MLFLOW_PARENT}` = '{parent_id}'"
    children = _retry(client.search_runs, [experiment_id], filter_string=query, max_results=1000)
    if not children:
        return
    if any(child.info.status == "RUNNING" for child in children):
        _retry(client.update_run, parent_id, status="RUNNING")
        return
    last = max(children, key=lambda child: child.info.start_time)
    ended = max(child.info.end_time or child.info.start_time for child in children)
    _retry(client.set_terminated, parent_id, last.info.status, end_time=ended)


def _experiment_id(client: Any, name: str, artifacts: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = _retry(client.get_experiment_by_name, name)
    if experiment is None:
        try:
            return _retry(client.create_experiment, name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        except MlflowException:
            experiment = _retry(client.get_experiment_by_name, name)  # a parallel worker created it first
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        _retry(client.restore_experiment, experiment.experiment_id)
    for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag, or by the UI, which asks its kind
        if key not in experiment.tags:
            _retry(client.set_experiment_tag, experiment.experiment_id, key, value)
    return experiment.experiment_id


def group_of(tags: Mapping[str, str]) -> str:
    """Which parent run a stage's run belongs to: its DVC experiment, or the workspace at a commit."""
    name = tags["dvc_exp_name"]
    return name if name != "workspace" else f"workspace@{tags['git_commit'][:7]}"


def parent_run(client: Any, experiment_id: str, group: str, tags: Mapping[str, str]) -> str:
    """The run that holds one `dvc exp run`'s stage runs as nested runs (created by its first stage)."""
    query = f"tags.{PARENT_TAG} = '{group}'"
    found = _retry(client.search_runs, [experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    keep = {k: v for k, v in tags.items() if k in ("git_commit", "dvc_exp_name", "dvc_exp_baseline_rev", "mlflow.source.git.commit")}
    run = _retry(client.create_run, experiment_id, tags={**keep, PARENT_TAG: group}, run_name=group)
    return run.info.run_id  # RUNNING with its first stage; refresh_parent gives it the stages' span and outcome


@contextlib.contextmanager
def start_run(
    stage: str, params: Mapping[str, Any] | Any, experiment: str = DEFAULT_EXPERIMENT
) -> Iterator[RunLogger]:
    """Open an MLflow run `<stage>-<DVC exp name>` with tags and params; closes it FINISHED or FAILED.

    Without MLflow (a core install, no `pipeline` extra) the stage still runs, untracked, and says so once."""
    try:
        importlib.import_module("mlflow")
    except ImportError:
        print(f"{stage}: MLflow is not installed, so this run is not tracked (pip install 'd2dprompt[pipeline]')", file=sys.stderr)
        yield UntrackedRun()
        return
    _quiet_mlflow()
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import (
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    uri = tracking_uri()
    with _store_init_lock(uri):
        client = MlflowClient(tracking_uri=uri)  # opens the store, creating or migrating its schema
    experiment_id = _experiment_id(client, experiment, artifact_location(uri))
    # MLflow 3 opens an experiment of unknown kind on its GenAI pages (traces, evaluations); say what this one is
    _retry(client.set_experiment_tag, experiment_id, "mlflow.experimentKind", "custom_model_development")
    here = process_tags()
    try:
        close_killed_runs(client, experiment_id, stage, here)
    except Exception as error:  # housekeeping: a store that cannot search must not stop the stage
        _log.warning("mlflow: could not check for runs left RUNNING by killed %s stages (%s)", stage, error)
    tags = {**run_tags(stage), **here}
    tags.update({MLFLOW_SOURCE_NAME: Path(sys.argv[0]).name or "python", MLFLOW_SOURCE_TYPE: "LOCAL"})
    with contextlib.suppress(Exception):
        tags[MLFLOW_USER] = getpass.getuser()
    tags[MLFLOW_PARENT] = parent = parent_run(client, experiment_id, group_of(tags), tags)  # the UI nests the stages under it
    run = _retry(client.create_run, experiment_id, tags=tags, run_name=f"{stage}-{tags['dvc_exp_name']}")
    refresh_parent(client, experiment_id, parent)
    logger = RunLogger(client, run.info.run_id)
    status = "FAILED"
    try:
        logger.log_params(params)
        yield logger
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _retry(client.set_terminated, logger.run_id, status)
        try:
            refresh_parent(client, experiment_id, parent)
        except Exception as error:  # housekeeping: must not hide the stage's own outcome
            _log.warning("mlflow: could not update the parent run %s (%s)", parent, error)
