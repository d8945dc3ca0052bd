"""python -m d2dprompt.pipeline.ablate [--only baseline,no_dice] [--seeds 3] [--set train.epochs=3]... [--jobs 1] [--out ablation] [--dry-run | --report-only] [--force]

Ablation study through DVC experiments: each named experiment of EXPERIMENTS (a set of `-S`
overrides) is queued once per seed as `dvc exp run --queue -S ... --name <experiment>-s<seed>`
(seed s sets train.seed and latents.seed; in the few-shot protocol fewshot_k1 / _k2 / _k4 only fewshot.seed, the
draw of the k reference images), `dvc queue start -j <jobs>` runs the queue, and this
command polls `dvc exp show --json` until every run has succeeded or failed. Results are read only
through `dvc exp show --json`, so `--report-only` reports runs made any other way (`dvc exp run
--temp -n baseline-s0 ...`, `dvc queue start -j 2`) as long as they carry these names.

Every metrics file DVC reports for a run counts; its "mean" block gives image_AUROC, pixel_AUROC and
pixel_AUPRO, labelled by the file's path under metrics/ without .json (`sample` for
metrics/sample.json, `d2dprompt/sample` for metrics/d2dprompt/sample.json). The report, in --out:
ablation.md (mean ± sample std over seeds), ablation.json (the same, plus every seed's values and
its experiment name and rev) and ablation.png (grouped bars, error bars = the std).
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import typer

from d2dprompt.core.runtime.cli import summary

from d2dprompt.core.runtime.outputs import atomic_file, write_json

# name -> -S overrides on top of params.yaml; `baseline` is params.yaml itself (cached + joint, levels [0, 1])
EXPERIMENTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "no_focal": {"loss.focal": "0"},
    "no_dice": {"loss.dice": "0"},
    "no_image": {"loss.image": "0"},
    "no_compound": {"prompt.depth": "1"},  # depth 1 = no deep compound prompts, only the 12 learned context tokens
    "paired": {"attention.prompts": "paired"},
    "full": {"attention.mode": "full"},
    "level0": {"attention.levels": "[0]"},
    "level1": {"attention.levels": "[1]"},
    # the field's few-shot protocol: k normal images per category, beside the patch-kNN floor on the same draws
    **{f"fewshot_k{k}": {"fewshot.k": str(k), "methods": "[d2dprompt,patchknn]"} for k in (1, 2, 4)},
}
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "AUPIMO")
BASELINE = "baseline"  # the experiment every other row is compared with, seed by seed
CONFIDENCE = 0.95  # of the Student-t interval of a mean over seeds
ALPHA = 0.05  # a row whose paired difference from the baseline has p >= ALPHA on a metric cannot be told apart on it
SEED_KEYS = ("train.seed", "latents.seed")  # training order + prompt init, and the synthetic anomalies / validation split
# what a seed varies per experiment when not SEED_KEYS: few-shot runs vary only the draw of the k reference images
SEEDED_BY = {name: ("fewshot.seed",) for name in EXPERIMENTS if name.startswith("fewshot_")}
ALL_SEED_KEYS = (*SEED_KEYS, "fewshot.seed")
UNFINISHED = ("queued", "running")  # executor states of `dvc exp show --json` (also "success", "failed")
STD = "sample standard deviation over seeds (n - 1 denominator); undefined (null) for a single seed"


class AblationError(Exception):
    """A request this command cannot carry out; the message says what to do instead."""


@dataclass(frozen=True)
class Run:
    name: str  # the DVC experiment name, <experiment>-s<seed>
    experiment: str
    seed: int
    overrides: tuple[str, ...]  # key=value, as passed to -S


@dataclass
class Entry:
    """One experiment as `dvc exp show --json` lists it."""

    name: str
    rev: str
    state: str  # success | failed | queued | running
    log: str | None = None
    metrics: dict[str, dict] = field(default_factory=dict)  # label -> the file's "mean" block


# ---- planning ---------------------------------------------------------------------------------------------------


def parse_sets(items: list[str]) -> dict[str, str | None]:
    """`--set key=value` items -> {key: value}; the seed keys belong to --seeds. DVC's `+key=value` (add a key) and
    `~key` (remove one, e.g. ~download.folders.sample) pass through as they are."""
    sets: dict[str, str | None] = {}
    for item in items:
        if item.startswith("~") and "=" not in item and item[1:].strip():
            sets[item.strip()] = None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AblationError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        if key.strip() in ALL_SEED_KEYS:
            raise AblationError(f"--set {item!r}: {key.strip()} is set per run by --seeds")
        sets[key.strip()] = value
    return sets


def plan_runs(only: str | None, seeds: int, sets: list[str]) -> list[Run]:
    """One Run per (experiment, seed), experiments in EXPERIMENTS order. The experiment's own overrides win over
    --set (an ablation that turns a term off must stay off), and the seed keys over both."""
    if seeds < 1:
        raise AblationError(f"--seeds {seeds}: need at least 1")
    names = list(EXPERIMENTS)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in EXPERIMENTS]
        if unknown or not names:
            raise AblationError(f"--only {only!r}: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(EXPERIMENTS)}")
        names = [n for n in EXPERIMENTS if n in names]
    common = parse_sets(sets)
    runs = []
    for name in names:
        for seed in range(seeds):
            values = {**common, **EXPERIMENTS[name], **{key: str(seed) for key in SEEDED_BY.get(name, SEED_KEYS)}}
            runs.append(Run(f"{name}-s{seed}", name, seed, tuple(k if v is None else f"{k}={v}" for k, v in values.items())))
    return runs


def queue_argv(run: Run) -> list[str]:
    return ["dvc", "exp", "run", "--queue", *(arg for o in run.overrides for arg in ("-S", o)), "--name", run.name]


def start_argv(jobs: int) -> list[str]:
    return ["dvc", "queue", "start", "-j", str(jobs)]


def show_argv(rev: str) -> list[str]:
    return ["dvc", "exp", "show", "--json", "--rev", rev]


# ---- reading `dvc exp show --json` ------------------------------------------------------------------------------


def metrics_label(path: str) -> str:
    """'metrics/sample.json' -> 'sample'; 'metrics/d2dprompt/sample.json' -> 'd2dprompt/sample'."""
    parts = PurePosixPath(path.replace("\\", "/"))
    if parts.parts[:1] == ("metrics",):
        parts = PurePosixPath(*parts.parts[1:])
    return str(parts.with_suffix("")) if parts.suffix == ".json" else str(parts)


def mean_blocks(metrics: dict) -> dict[str, dict]:
    """DVC's {path: {"data": {...}}} -> {label: mean block}; files without a "mean" dict (or that DVC could not read,
    {"error": ...}) are left out."""
    out = {}
    for path, entry in (metrics or {}).items():
        data = entry.get("data") if isinstance(entry, dict) else None
        if isinstance(data, dict) and isinstance(data.get("mean"), dict):
            out[metrics_label(path)] = data["mean"]
    return out


def parse_exp_show(data: list) -> dict[str, Entry]:
    """Named experiments of every baseline in DVC 3's `exp show --json` list -> {name: Entry}.

    A run with no executor (made with --temp, or in the workspace) is a success unless DVC reports an error. A
    failed run keeps its baseline's metrics in DVC's output: only successes carry metrics here. When one name
    occurs twice (a failed queue entry beside a success), the success wins.
    """
    found: dict[str, Entry] = {}
    for baseline in data:
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or []
            name = exp.get("name") or (revs[0].get("name") if revs else None)
            if not name or not revs:
                continue
            rev, executor = revs[0], exp.get("executor") or {}
            state = executor.get("state") or ("failed" if rev.get("error") else "success")
            entry = Entry(name, rev.get("rev", ""), state, (executor.get("local") or {}).get("log"))
            if state == "success":
                entry.metrics = mean_blocks((rev.get("data") or {}).get("metrics") or {})
            if name not in found or found[name].state != "success":
                found[name] = entry
    return found


# ---- aggregation and the report ---------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict:
    """mean and sample std (n - 1) of the non-null values, and the mean's Student-t interval (CONFIDENCE); std and
    the interval are None below two values, the mean below one."""
    from d2dprompt.core.eval.bootstrap import seed_mean

    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    mean = sum(vals) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    interval = seed_mean(vals, CONFIDENCE) if n > 1 else None
    return {"mean": mean, "std": std, "lo": interval.lo if interval else None, "hi": interval.hi if interval else None, "n": n, "values": vals}


def versus_baseline(row: dict, baseline: dict) -> dict[str, dict]:
    """Per metric, the row minus the baseline on the seeds both have (paired): mean difference, its Student-t
    interval and the paired t-test's p; a metric with fewer than two shared seeds is left out."""
    from d2dprompt.core.eval.bootstrap import seed_difference

    by_seed = {run["seed"]: run for run in baseline["runs"]}
    out = {}
    for metric in METRICS:
        pairs = [(run[metric], by_seed[run["seed"]][metric]) for run in row["runs"]
                 if run["seed"] in by_seed and run[metric] is not None and by_seed[run["seed"]][metric] is not None]
        if len(pairs) >= 2:
            d = seed_difference([a for a, _ in pairs], [b for _, b in pairs], CONFIDENCE)
            out[metric] = {"diff": d.diff, "lo": d.lo, "hi": d.hi, "p_value": d.p_value, "seeds": d.n_used, "apart": bool(d.p_value < ALPHA)}
    return out


def aggregate(runs: list[Run], entries: dict[str, Entry]) -> list[dict]:
    """One row per (experiment, metrics label), experiments in plan order: the METRICS summarized over the seeds
    that succeeded, plus each seed's run (name, rev, values)."""
    rows = []
    for experiment in dict.fromkeys(r.experiment for r in runs):
        done = [(r, entries[r.name]) for r in runs if r.experiment == experiment and r.name in entries and entries[r.name].state == "success"]
        for label in sorted({label for _, e in done for label in e.metrics}):
            seeds = [(r, e) for r, e in done if label in e.metrics]
            rows.append({
                "experiment": experiment,
                "overrides": [o for o in seeds[0][0].overrides if o.split("=")[0] not in ALL_SEED_KEYS],
                "metrics_file": label,
                "n": len(seeds),
                **{m: summarize([e.metrics[label].get(m) for _, e in seeds]) for m in METRICS},
                "runs": [{"name": r.name, "seed": r.seed, "rev": e.rev, **{m: e.metrics[label].get(m) for m in METRICS}} for r, e in seeds],
            })
    baselines = {r["metrics_file"]: r for r in rows if r["experiment"] == BASELINE}
    for row in rows:
        if row["experiment"] != BASELINE and row["metrics_file"] in baselines:
            row["vs_baseline"] = versus_baseline(row, baselines[row["metrics_file"]])
    return rows


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f} [{stat['lo']:.3f}, {stat['hi']:.3f}]"


def _versus(row: dict) -> str:
    """The baseline column: which metrics tell this row apart from the baseline, or that none does."""
    if row["experiment"] == BASELINE:
        return "–"
    found = row.get("vs_baseline") or {}
    if not found:
        return "n/a (needs 2 seeds of it and of baseline)"
    apart = [f"{m} {d['diff']:+.3f} (p={d['p_value']:.3g})" for m, d in found.items() if d["apart"]]
    return "; ".join(apart) if apart else f"cannot be told apart (p >= {ALPHA:g} on every metric)"


def format_markdown(rows: list[dict], baseline_rev: str, problems: dict[str, str]) -> str:
    lines = [
        "# Ablation",
        "",
        f"Experiments derived from commit `{baseline_rev[:7]}`. Each cell: mean ± {STD} [{CONFIDENCE:.0%} Student-t "
        "interval of the mean]; n = seeds with a result. \"vs baseline\": the metrics on which a row differs from the "
        f"baseline in a paired t-test over the seeds both ran (p < {ALPHA:g}); otherwise the two cannot be told apart.",
        "",
        "| experiment | overrides | metrics | " + " | ".join(METRICS) + " | n | vs baseline |",
        "|---|---|---|" + "---:|" * len(METRICS) + "---:|---|",
    ]
    for row in rows:
        overrides = " ".join(f"`{o}`" for o in row["overrides"]) or "–"
        cells = " | ".join(_cell(row[m]) for m in METRICS)
        lines.append(f"| {row['experiment']} | {overrides} | {row['metrics_file']} | {cells} | {row['n']} | {_versus(row)} |")
    if problems:
        lines += ["", "Runs without a result:", ""] + [f"- `{name}`: {why}" for name, why in problems.items()]
    return "\n".join(lines) + "\n"


def write_png(rows: list[dict], dest: Path) -> None:
    """Grouped bars: one group per experiment, one bar per metric, error bars = std over seeds; one panel per
    metrics file."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and queue workers
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["metrics_file"] for r in rows))
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    width = 0.8 / len(METRICS)
    fig, axes = plt.subplots(len(labels), 1, figsize=(max(6.0, 1.1 * len(experiments) + 2), 3.6 * len(labels)), squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        by_exp = {r["experiment"]: r for r in rows if r["metrics_file"] == label}
        for i, metric in enumerate(METRICS):
            stats = [by_exp[e][metric] if e in by_exp else {"mean": None, "std": None} for e in experiments]
            means = [s["mean"] if s["mean"] is not None else math.nan for s in stats]
            errs = [s["std"] or 0.0 for s in stats]
            xs = [x + (i - (len(METRICS) - 1) / 2) * width for x in range(len(experiments))]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=metric)
        ax.set_xticks(range(len(experiments)), experiments, rotation=30, ha="right")
        ax.set_ylim(0, 1)  # every metric is a rate in [0, 1]; a cut axis would exaggerate small gaps
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{label}: mean over seeds, error bar = sample std")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: inside it hides bars
    fig.tight_layout()
    with atomic_file(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(out: Path, rows: list[dict], runs: list[Run], baseline_rev: str, problems: dict[str, str], queued: bool) -> None:
    # file by file, each atomic: replacing the whole folder would also take whatever else the user keeps in --out
    with atomic_file(out / "ablation.md") as tmp:
        tmp.write_text(format_markdown(rows, baseline_rev, problems))
    if rows:
        write_png(rows, out / "ablation.png")
    write_json(out / "ablation.json", {
        "baseline_rev": baseline_rev,
        "std": STD,
        "metrics": list(METRICS),
        "queued_by_this_command": queued,  # false (--report-only): "plan" says what these names should have run
        "plan": {r.name: {"experiment": r.experiment, "seed": r.seed, "overrides": list(r.overrides)} for r in runs},
        "results": rows,
        "without_result": problems,
    })


# ---- talking to DVC ---------------------------------------------------------------------------------------------


def _call(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise AblationError(f"{argv[0]} not found on PATH (activate the venv, or run `make ablate`)") from None
    except subprocess.TimeoutExpired:  # the child is killed; the caller decides whether to ask again
        raise AblationError(f"`{shlex.join(argv)}` did not answer within {timeout:g} s") from None
    if done.returncode:
        raise AblationError(f"`{shlex.join(argv)}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done


SHOW_TIMEOUT_S = 120  # `dvc exp show` answers in seconds; once in a while it blocks on a lock for good: ask again


def exp_show(rev: str) -> dict[str, Entry]:
    return parse_exp_show(json.loads(_call(show_argv(rev), SHOW_TIMEOUT_S).stdout or "[]"))


def log_tail(path: str | None, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


SHOW_RETRIES = 10  # `dvc exp show` fails (or hangs, see SHOW_TIMEOUT_S) now and then while workers run: a race, not an error


def wait_for(names: list[str], rev: str, poll: float) -> dict[str, Entry]:
    last, failures = None, 0
    while True:
        try:
            entries = exp_show(rev)
            failures = 0
        except AblationError:
            failures += 1
            if failures > SHOW_RETRIES:
                raise
            time.sleep(poll)
            continue
        states = {n: entries[n].state if n in entries else "missing" for n in names}
        counts = {s: sum(v == s for v in states.values()) for s in ("success", "failed", "running", "queued", "missing")}
        if counts != last:
            running = ", ".join(n for n, s in states.items() if s == "running") or "-"
            print(f"[{time.strftime('%H:%M:%S')}] {counts['success']} succeeded, {counts['failed']} failed, "
                  f"{counts['queued']} queued; running: {running}", flush=True)
            last = counts
        if not any(s in UNFINISHED for s in states.values()):
            return entries
        time.sleep(poll)


def queue_all(runs: list[Run], jobs: int, rev: str, force: bool) -> None:
    entries = exp_show(rev)
    clash = {r.name: entries[r.name].state for r in runs if r.name in entries}
    if clash and not force:
        listed = ", ".join(f"{n} ({s})" for n, s in clash.items())
        raise AblationError(f"experiments already exist under {rev[:7]}: {listed}; report them with --report-only, "
                            "or pass --force to remove them (dvc exp remove) and run them again")
    if clash:
        running = [n for n, s in clash.items() if s == "running"]
        if running:
            raise AblationError(f"still running: {', '.join(running)}; wait, or stop them with `dvc queue kill <name>`")
        print(f"--force: removing {', '.join(clash)}", flush=True)
        _call(["dvc", "exp", "remove", *clash])  # no --rev: beside names DVC ignores it, alone it removes every experiment
    ours = {r.name for r in runs}
    others = [n for n, e in entries.items() if e.state in UNFINISHED and n not in ours]
    if others:
        print(f"note: the queue also holds {', '.join(others)}; `dvc queue start` runs those too", flush=True)
    for run in runs:
        print("$ " + shlex.join(queue_argv(run)), flush=True)
        _call(queue_argv(run))
    print("$ " + shlex.join(start_argv(jobs)), flush=True)
    # not _call: the workers `dvc queue start` spawns inherit its output, so reading it to the end would wait for the
    # whole queue (and an unread pipe could fill and stall them); a file takes it, the runs are followed through
    # `dvc exp show`, and a start that fails at once is reported
    with tempfile.TemporaryFile(mode="w+") as err:
        started = subprocess.Popen(start_argv(jobs), stdout=subprocess.DEVNULL, stderr=err)
        try:
            started.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return  # still attached to its workers: they run
        if started.returncode:
            err.seek(0)
            raise AblationError(f"`{shlex.join(start_argv(jobs))}` failed ({started.returncode}): {err.read().strip()}")


def from_report(path: Path) -> tuple[list[Run], dict[str, Entry], str]:
    """The runs, their per-seed results and the baseline rev an earlier report recorded (ablation.json), so the
    table is rebuilt by this code's aggregation without DVC (a clone without the experiments)."""
    try:
        record = json.loads(path.read_text())
        runs = [Run(name, plan["experiment"], plan["seed"], tuple(plan["overrides"])) for name, plan in record["plan"].items()]
        entries: dict[str, Entry] = {}
        for row in record["results"]:
            for run in row["runs"]:
                entry = entries.setdefault(run["name"], Entry(run["name"], run["rev"], "success"))
                entry.metrics[row["metrics_file"]] = {m: run.get(m) for m in METRICS}
        return runs, entries, record["baseline_rev"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AblationError(f"{path}: not an ablation report ({type(err).__name__}: {err})") from None


def resolve_rev(rev: str) -> str:
    return _call(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"]).stdout.strip()


# ---- CLI --------------------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help="Queue, run and report an ablation study as DVC experiments.")


@app.command(help=summary(__doc__))
def main(
    only: str | None = typer.Option(None, help=f"comma list of experiments; default all: {', '.join(EXPERIMENTS)}"),
    seeds: int = typer.Option(3, min=1, help="seeds 0..N-1 per experiment (train.seed, latents.seed; fewshot_*: fewshot.seed, the draw); 3, the field's usual count, is the fewest that gives a std"),
    sets: list[str] = typer.Option([], "--set", "-S", help="key=value for every run (repeatable); an experiment's own overrides win"),
    jobs: int = typer.Option(1, min=1, help="`dvc queue start -j`; 1 because a CPU run already uses every core"),
    out: Path = typer.Option(Path("ablation"), help="report folder: ablation.md, ablation.json, ablation.png"),
    rev: str = typer.Option("HEAD", help="baseline commit whose experiments are read (DVC names are unique per baseline)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc commands, run nothing"),
    report_only: bool = typer.Option(False, "--report-only", help="run nothing; report the existing experiments of these names"),
    force: bool = typer.Option(False, "--force", help="remove existing experiments of these names, then run them again"),
    poll: float = typer.Option(10.0, min=0.1, help="seconds between `dvc exp show` polls; each costs ~2 s of CPU, a run takes minutes"),
    from_json: Path | None = typer.Option(None, "--from-json", help="run nothing, ask DVC nothing: rebuild the report from an earlier ablation.json's per-seed values"),
) -> None:
    try:
        if from_json is not None:
            runs, entries, baseline = from_report(from_json)
            rows = aggregate(runs, entries)
            write_report(out, rows, runs, baseline, {}, queued=False)
            print(format_markdown(rows, baseline, {}))
            return
        runs = plan_runs(only, seeds, sets)
        if dry_run:
            for run in runs:
                print(shlex.join(queue_argv(run)))
            print(shlex.join(start_argv(jobs)))
            print(shlex.join(show_argv(rev)) + f"  # until no run is queued or running, then the report in {out}/")
            return
        baseline = resolve_rev(rev)  # pinned: a commit made while the queue runs must not hide the runs from exp show
        if not report_only:
            queue_all(runs, jobs, baseline, force)
            print(f"waiting for {len(runs)} runs (Ctrl+C stops waiting, not the runs)", flush=True)
            entries = wait_for([r.name for r in runs], baseline, poll)
        else:
            entries = exp_show(baseline)
    except AblationError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("\nstopped waiting; the runs go on (`dvc queue status`); report them later with --report-only", err=True)
        raise typer.Exit(130) from None

    problems: dict[str, str] = {}
    for run in runs:
        entry = entries.get(run.name)
        if entry is None:
            problems[run.name] = f"no experiment of this name under {baseline[:7]}"
        elif entry.state != "success":
            problems[run.name] = f"{entry.state}; log: {entry.log or '-'} (`dvc queue logs {run.name}`)"
        elif not entry.metrics:
            problems[run.name] = "succeeded but DVC reports no metrics file with a 'mean' block"
    for name, why in problems.items():
        typer.echo(f"{'missing' if report_only else 'FAILED'}: {name}: {why}", err=True)
        if name in entries and entries[name].state == "failed":
            typer.echo(log_tail(entries[name].log), err=True)
    rows = aggregate(runs, entries)
    if not rows:
        typer.echo(f"error: no run has results to report (baseline {baseline[:7]})", err=True)
        raise typer.Exit(1)
    write_report(out, rows, runs, baseline, problems, queued=not report_only)
    print(format_markdown(rows, baseline, {}))
    print(f"report: {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    if problems and not report_only:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
