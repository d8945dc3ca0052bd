"""python -m d2dprompt.pipeline.compare DATASET [--params params.yaml] [--evaluated stages/evaluate] [--out stages/compare] [--metrics metrics/compare]

The methods of params.yaml's `methods` side by side on one dataset's test images (dvc.yaml: compare@<dataset>).
It reads what each evaluate@<method>-<dataset> computed (replicas.safetensors: exact metrics and bootstrap replicas
per category; the same rows and resampling params for every method, checked), no map, and for every pair of methods
writes the difference of image_AUROC, pixel_AUROC, pixel_AUPRO and AUPIMO with its paired-bootstrap interval and
p-value, per category and for the mean over categories: every replica draws the same test images for both methods
(evaluate.bootstrap resamples, stratified by label, evaluate.bootstrap_seed), so what the two share, such as hard
images, cancels. Writes `metrics/compare/<dataset>.json` and `.md`, and under
`stages/compare/<dataset>/` the plot data: `aupimo.csv` (each anomalous test image's AUPIMO per method) and
`differences.csv` (each pair's mean differences with their intervals). A pair's mean averages only the categories
where the metric is defined for both methods, and says how many (`categories`). With one method listed there is nothing to
pair: it says so and writes that method's per-image AUPIMO only.
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import typer

from d2dprompt.core.data.evaluated import REPLICAS_FILE, Replicated, read_replicated
from d2dprompt.core.eval.bootstrap import METRICS
from d2dprompt.core.eval.metrics import summarize
from d2dprompt.core.eval.uncertainty import HI, LO, paired_differences, replica_settings, with_intervals
from d2dprompt.core.runtime import numerics
from d2dprompt.core.runtime.cli import app_for
from d2dprompt.core.runtime.config import EvaluateParams, ParamsError, flatten
from d2dprompt.core.runtime.outputs import atomic_dir, atomic_file, nan_to_null, write_json
from d2dprompt.params import load_params

ALPHA = 0.05  # a pair whose interval holds 0 (p >= ALPHA at 95 %) is reported as "cannot tell apart"
HOW_TO_READ = ("Each cell is the first method's metric minus the second's, its {confidence:.0%} paired-bootstrap interval over "
               "the test images and the p-value of \"no difference\": an interval that holds 0 (p >= {alpha:g}) means these "
               "test images cannot tell the two methods apart.")


def method_metrics(data: Replicated, ev: EvaluateParams) -> tuple[dict, dict, np.ndarray, list[str]]:
    """(summary with intervals {category | mean: {metric: value, metric_lo, metric_hi}}, replicas per category,
    per-image AUPIMO, why AUPIMO is n/a in a category that has both classes), from what evaluate computed."""
    return with_intervals(summarize(data.exact), data.replicas, ev.confidence), data.replicas, data.aupimo, data.notes


def drawn_alike(data: Replicated, path: Path, ev: EvaluateParams, params: Path) -> None:
    """Replicas drawn under other params (evaluate run by hand with another file) would pair different resamples."""
    wanted = replica_settings(ev)
    for key, value in data.settings.items():
        if wanted.get(key) != value:
            raise ValueError(f"{path}: replicas drawn with {key} {value}, {params} says {wanted.get(key)}; rerun the evaluate stage with {params}")


def same_rows(evaluated: dict[str, Replicated], files: dict[str, Path]) -> None:
    """Every method must have scored the same test images in the same order: a pairing needs it."""
    (first, reference), *others = evaluated.items()
    for name, data in others:
        if data.image_paths != reference.image_paths or not np.array_equal(data.labels, reference.labels):
            raise ValueError(f"{files[name]} and {files[first]}: scored different test rows; rerun both evaluate stages on the same latents")


def difference_cell(d: dict | None, n_categories: int) -> str:
    """One pair's difference; a mean that averages fewer than the `n_categories` (the metric undefined for one
    method in some) says over how many."""
    if not d or math.isnan(d["diff"]):
        return "n/a"
    over = f" over {d['categories']}/{n_categories} categories" if d.get("categories", n_categories) < n_categories else ""
    if math.isnan(d["lo"]):
        return f"{d['diff']:+.3f}{over}"
    verdict = "" if d["p_value"] < ALPHA else " (=)"
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] p={d['p_value']:.3f}{verdict}{over}"


def markdown(dataset: str, summaries: dict[str, dict], pairs: dict[str, dict], ev: EvaluateParams, notes: dict[str, list[str]]) -> str:
    lines = [f"# {dataset}: {', '.join(summaries)} compared", ""]
    lines += [f"- {name}: {note}" for name, method_notes in notes.items() for note in method_notes] + ([""] if any(notes.values()) else [])
    lines += ["Mean over categories, each with its interval:", "", "| method | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, summary in summaries.items():
        mean = summary["mean"]
        cells = ["n/a" if math.isnan(mean.get(m, math.nan)) else f"{mean[m]:.4f}" + (
            "" if math.isnan(mean.get(m + LO, math.nan)) else f" [{mean[m + LO]:.3f}, {mean[m + HI]:.3f}]") for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""]
    if not pairs:
        lines += ["One method is listed: nothing to compare. List two or more in `methods` (`dvc exp run -S 'methods=[d2dprompt,draem]'`).", ""]
        return "\n".join(lines)
    lines += [HOW_TO_READ.format(confidence=ev.confidence, alpha=ALPHA) + " (=) marks those pairs.", ""]
    categories = list(next(iter(pairs.values())))
    for category in ["mean", *[c for c in categories if c != "mean"]]:
        lines += [f"## {'mean over categories' if category == 'mean' else category}", "",
                  "| pair | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for pair, rows in pairs.items():
            lines.append(f"| {pair} | " + " | ".join(difference_cell(rows.get(category, {}).get(m), len(categories) - 1) for m in METRICS) + " |")
        lines.append("")
    lines += [f"{ev.bootstrap} resamples of the test images, stratified by label, seed {ev.bootstrap_seed}; the mean's interval resamples every "
              "category at once. AUPIMO: mean over anomalous images of the recall integrated over FPR "
              f"{ev.aupimo_fpr[0]:g} to {ev.aupimo_fpr[1]:g} on normal images (log scale).", ""]
    return "\n".join(lines)


def write_plot_data(folder: Path, evaluated: dict[str, Replicated], per_image: dict[str, np.ndarray], pairs: dict[str, dict]) -> None:
    with (folder / "aupimo.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "category", "image_path", "aupimo"])
        for name, data in evaluated.items():
            for path, category, value in zip(data.image_paths, data.categories, per_image[name].tolist()):
                if value == value:  # normal images have no AUPIMO
                    writer.writerow([name, category, path, repr(value)])
    with (folder / "differences.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["pair", "metric", "diff", "lo", "hi", "p_value", "categories"])
        for pair, rows in pairs.items():
            for metric, d in rows.get("mean", {}).items():
                writer.writerow([pair, metric, *(repr(d[k]) for k in ("diff", "lo", "hi", "p_value")), d["categories"]])


def main(
    dataset: str = typer.Argument(..., help="a dataset every listed method was evaluated on"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    evaluated: Path = typer.Option(Path("stages/evaluate"), help="evaluate's outputs: <evaluated>/<method>/<dataset>/replicas.safetensors"),
    out: Path = typer.Option(Path("stages/compare"), help="plot data goes to <out>/<dataset>/"),
    metrics: Path = typer.Option(Path("metrics/compare"), help="<metrics>/<dataset>.json and .md"),
) -> None:
    from d2dprompt.core.runtime.tracking import start_run

    try:
        cfg = load_params(params)
        ev = cfg.evaluate
        if not ev.bootstrap:
            raise ParamsError(f"{params}: evaluate.bootstrap: 0 gives no intervals to compare with; set it to 1000 (or more)")
        files = {name: evaluated / name / dataset / REPLICAS_FILE for name in cfg.methods}
        data = {name: read_replicated(path) for name, path in files.items()}
        for name, d in data.items():
            drawn_alike(d, files[name], ev, params)
        same_rows(data, files)
        with start_run("compare", {**flatten(cfg), "compare.dataset": dataset}) as log:
            log.set_tags(numerics.machine_tags())
            results = {name: method_metrics(d, ev) for name, d in data.items()}
            summaries = {name: r[0] for name, r in results.items()}
            notes = {name: r[3] for name, r in results.items()}
            pairs = {f"{a} - {b}": paired_differences(summaries[a], summaries[b], results[a][1], results[b][1], ev.confidence)
                     for a, b in itertools.combinations(cfg.methods, 2)}
            record = {"dataset": dataset, "methods": list(cfg.methods), "confidence": ev.confidence, "resamples": ev.bootstrap,
                      "seed": ev.bootstrap_seed, "means": {n: s["mean"] for n, s in summaries.items()}, "pairs": pairs,
                      "notes": {n: found for n, found in notes.items() if found}}
            metrics.mkdir(parents=True, exist_ok=True)
            with atomic_dir(out / dataset) as tmp:
                write_plot_data(tmp, data, {n: r[2] for n, r in results.items()}, pairs)
            write_json(metrics / f"{dataset}.json", nan_to_null(record))
            with atomic_file(metrics / f"{dataset}.md") as tmp_md:
                tmp_md.write_text(markdown(dataset, summaries, pairs, ev, notes))
            log.log_metrics({f"compare.{dataset}.{pair.replace(' - ', '_vs_')}.{metric}.{key}": value
                             for pair, rows in pairs.items() for metric, d in rows["mean"].items() for key, value in d.items() if value == value})
            log.log_artifact(metrics / f"{dataset}.md")
        for name, method_notes in notes.items():
            for note in method_notes:
                typer.echo(f"{dataset} {name}: {note}")
        n_categories = len(set(next(iter(data.values())).categories))
        for pair, rows in pairs.items():
            typer.echo(f"{dataset} {pair}: " + "; ".join(f"{m} {difference_cell(d, n_categories)}" for m, d in rows["mean"].items()))
        if not pairs:
            typer.echo(f"{dataset}: one method listed ({cfg.methods[0]}), nothing to compare")
    except (ParamsError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
