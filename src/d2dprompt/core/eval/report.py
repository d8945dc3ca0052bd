"""What people look at after evaluation: markdown table, DVC plot data and PNG grids. Writes files only."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from d2dprompt.core.data.images import load_rgb, resize_rgb
from d2dprompt.core.eval.metrics import mean_coverage, pixel_curves
from d2dprompt.core.eval.uncertainty import HI, LO
from d2dprompt.core.runtime.outputs import atomic_file, nan_to_null, write_json

BAR_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")  # the per-category bars users compare first
CURVE_POINTS = 400  # points kept per curve: smooth on screen, small in git diffs and DVC caches


def is_bound(name: str) -> bool:
    return name.endswith((LO, HI))


def cell(values: dict[str, float], name: str) -> str:
    """'0.6611 [0.581, 0.742]' with its interval, '0.6611' without one, 'n/a' when undefined."""
    value = values.get(name, math.nan)
    if math.isnan(value):
        return "n/a"
    lo, hi = values.get(name + LO, math.nan), values.get(name + HI, math.nan)
    return f"{value:.4f}" if math.isnan(lo) or math.isnan(hi) else f"{value:.4f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(dataset: str, summary: dict[str, dict[str, float]], thresholds: dict, notes: list[str] = ()) -> str:
    names = [n for n in headline_first(summary["mean"]) if not is_bound(n)]
    lines = [f"# {dataset}: per-category metrics", ""]
    if names:  # none without test images (a folder of normal images only): the thresholds and notes remain
        lines += ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for category, values in summary.items() if names else ():
        cells = [cell(values, n) for n in names]
        label = f"**{category}**" if category == "mean" else category
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Thresholds for image_F1 / pixel_F1: image {thresholds['image']:.4f}, pixel {thresholds['pixel']:.4f} "
        f"({thresholds['source']}).",
        "",
    ]
    lines += [note + "\n" for note in notes if note]
    coverage = mean_coverage({cat: {k: v for k, v in values.items() if not is_bound(k)} for cat, values in summary.items()})
    if coverage["undefined"]:
        total = len(summary) - 1
        covered = ", ".join(f"{name} {coverage['mean_over'][name]} of {total}" for name in coverage["undefined"])
        lines += [
            "n/a: undefined for that category (a category without anomalous test images has no AUROC, AP, "
            f"AUPRO, F1Max or F1). Means cover the categories where the metric is defined: {covered}.",
            "",
        ]
    return "\n".join(lines)


HEADLINE = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "AUPIMO")  # what papers compare first: the first columns of `dvc exp show`


def headline_first(values: dict[str, float]) -> dict[str, float]:
    """The headline metrics (each with its interval bounds) first, then the rest in their order."""
    first = [k + suffix for k in HEADLINE for suffix in ("", LO, HI) if k + suffix in values]
    return {**{k: values[k] for k in first}, **{k: v for k, v in values.items() if k not in first}}


def write_metrics(folder: Path, dataset: str, summary: dict, thresholds: dict, validation: dict, interval_note: str = "",
                  notes: list[str] = (), numerics: dict[str, str] | None = None) -> list[Path]:
    """`<folder>/<dataset>.json` (undefined metrics as null, with what each mean covers, and `numerics`: what the
    bits depend on, core/runtime/numerics.py) and `.md`.

    {"mean": ..., "per_category": {category: ...}, ...}: the mean comes first in the file and, since
    DVC sorts flattened keys (mean.* < per_category.*), first in `dvc metrics show` / `dvc exp show`.
    """
    categories = {k: headline_first(v) for k, v in summary.items() if k != "mean"}
    point = {cat: {k: v for k, v in values.items() if not is_bound(k)} for cat, values in summary.items()}
    record = {"mean": headline_first(summary["mean"]), "per_category": categories, **mean_coverage(point),
              "thresholds": thresholds, "validation": validation, "notes": [n for n in (interval_note, *notes) if n]}
    if numerics:
        record["numerics"] = numerics
    paths = [folder / f"{dataset}.json", folder / f"{dataset}.md"]
    write_json(paths[0], nan_to_null(record))
    with atomic_file(paths[1]) as tmp:
        made_with = ["Computed with " + ", ".join(f"{k} {v}" for k, v in numerics.items()) + "."] if numerics else []
        tmp.write_text(markdown_table(dataset, summary, thresholds, [interval_note, *notes, *made_with]))
    return paths


def _decimate(*columns: np.ndarray) -> list[np.ndarray]:
    if columns[0].size <= CURVE_POINTS:
        return list(columns)
    keep = np.unique(np.linspace(0, columns[0].size - 1, CURVE_POINTS).round().astype(int))
    return [c[keep] for c in columns]


def _write_csv(path: Path, header: list[str], rows) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_plot_data(folder: Path, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, summary: dict) -> None:
    """ROC and PR curves (image and pixel level) and per-category metric bars, as DVC plot CSVs."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # a second to import: not for --help

    folder.mkdir(parents=True, exist_ok=True)
    curves = {}
    if labels.size and labels.min() != labels.max():  # a curve needs both classes
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=True)
        precision, recall, _ = precision_recall_curve(labels, scores)
        curves["image"] = (fpr, tpr, roc_auc_score(labels, scores), recall[::-1], precision[::-1], average_precision_score(labels, scores),
                           float(np.mean(labels)))
    pooled = pixel_curves(masks, maps) if masks.size else None  # exact, without scikit-learn's sort of every pixel
    if pooled is not None:
        curves["pixel"] = (pooled.fpr, pooled.tpr, pooled.auroc, pooled.recall, pooled.precision, pooled.ap, pooled.prevalence)
    for level, (fpr, tpr, auroc, recall, precision, ap, prevalence) in curves.items():
        # the curves pool every category's images, so their areas (in each file's `curve` column, the plot's
        # legend) differ from the per-category means of the metric files
        fx, fy = _decimate(fpr, tpr)
        label = f"AUROC {auroc:.3f} (pooled)"
        _write_csv(folder / f"{level}_roc.csv", ["fpr", "tpr", "curve"], ((a, b, label) for a, b in zip(fx, fy)))
        rx, ry = _decimate(recall, precision)
        label = f"AP {ap:.3f} (pooled)"
        _write_csv(folder / f"{level}_pr.csv", ["recall", "precision", "curve", "prevalence"], ((a, b, label, prevalence) for a, b in zip(rx, ry)))
    for name in BAR_METRICS:
        rows = [(cat, values[name]) for cat, values in summary.items() if cat != "mean"]
        _write_csv(folder / f"bars_{name}.csv", ["category", name], rows)


def display_range(maps: np.ndarray) -> tuple[float, float]:
    """The colour scale of a run's pictures: its maps' 0.1 to 99.9 percentiles (evaluate takes the validation
    maps and records the range in thresholds.json, so grids and predict overlays colour a value alike)."""
    low, high = (float(v) for v in np.quantile(maps, [0.001, 0.999]))
    return (low, high) if high > low else (low, low + 1.0)


def scaled(values: np.ndarray, display: tuple[float, float]) -> np.ndarray:
    low, high = display
    return (values - low) / (high - low)


def jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 RGB on the classic jet ramp (blue = normal, red = anomalous)."""
    x = np.clip(values, 0, 1)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where r, g, b peak
    return (np.clip(1.5 - np.abs(4 * (x - centres)), 0, 1) * 255).astype(np.uint8)


def write_grids(
    folder: Path, root: Path, rows: list, maps: np.ndarray, masks: np.ndarray, predicted: np.ndarray, scores: np.ndarray, labels: np.ndarray,
    per_side: int, display: tuple[float, float], thresholds=None, name: str = "",
) -> list[Path]:
    """Per category: image | anomaly map | predicted mask | ground truth | overlay, best and worst cases.

    Worst = anomalous images with the lowest scores and normal images with the highest; best = the
    opposite. Maps are coloured on `display` (the run's range, shown by the colour bar), as predict does.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    folder.mkdir(parents=True, exist_ok=True)
    ramp = ListedColormap(jet(np.linspace(0, 1, 256)) / 255.0)  # the same ramp as the heat panels and predict
    cut = f"; predicted mask = map >= {thresholds.pixel:.4g}, anomalous when score >= {thresholds.image:.4g}" if thresholds else ""
    paths = []
    for category in sorted({r.category for r in rows}):
        idx = np.array([i for i, r in enumerate(rows) if r.category == category])
        anomalous, normal = idx[labels[idx] == 1], idx[labels[idx] == 0]
        by_score_a = anomalous[np.argsort(scores[anomalous])]
        by_score_n = normal[np.argsort(scores[normal])]
        picks = [("worst", i) for i in list(by_score_a[:per_side]) + list(by_score_n[::-1][:per_side])]
        picks += [("best", i) for i in list(by_score_a[::-1][:per_side]) + list(by_score_n[:per_side])]
        fig, axes = plt.subplots(len(picks), 5, figsize=(13, 2.6 * len(picks) + 0.9), squeeze=False, layout="constrained")
        for ax_row, (kind, i) in zip(axes, picks):
            size = maps.shape[-1]
            image = resize_rgb(load_rgb(root / rows[i].image_path), size)
            heat = jet(scaled(maps[i], display))
            overlay = (0.55 * image + 0.45 * heat).astype(np.uint8)
            panels = (image, heat, predicted[i], masks[i], overlay)
            titles = (f"{kind}: {rows[i].defect_type}", f"score {scores[i]:.3f}", "predicted mask", "ground truth", "overlay")
            for ax, panel, title in zip(ax_row, panels, titles):
                ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1 if panel.ndim == 2 else None)
                ax.set_title(title, fontsize=11)
                ax.axis("off")
        fig.suptitle(f"{name + ' ' if name else ''}{category}: worst and best cases{cut}", fontsize=12)
        bar = fig.colorbar(ScalarMappable(Normalize(*display), ramp), ax=axes[:, 1], orientation="horizontal", fraction=0.03, pad=0.02)
        bar.set_label("anomaly map value", fontsize=10)
        with atomic_file(folder / f"{category}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(folder / f"{category}.png")
    return paths
