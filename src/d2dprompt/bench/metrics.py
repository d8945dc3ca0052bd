"""python -m d2dprompt.bench.metrics [--n 1725 --size 256] [--compare-sort --compare-sklearn --compare-anomalib]

Times the pixel metrics on a synthetic workload the size of MVTec AD's test set (1,725 maps of
256x256 float32, ~70% of images anomalous). Masks hold a few ellipses, lobed blobs and scratches of
varied size per image; maps are smoothed noise plus a blurred copy of the mask at a random strength,
squashed to (0, 1). Prints seconds per step, the total, and peak memory.

It also times pixel_curves, the pooled curves of evaluate's plots; --compare-sklearn adds scikit-learn's roc_curve and
precision_recall_curve on the flattened pixels, what those plots used before.

--compare-sort times a plain sort and argsort of all scores (what a one-global-sort design pays
first); --compare-sklearn times scikit-learn's roc_auc_score / average_precision_score on the
flattened pixels; --compare-anomalib times anomalib's AUPRO on the same workload. Run that one with
a Python that has anomalib (see BENCHMARKS.md), e.g.
`PYTHONPATH=src /tmp/anomalib-venv/bin/python -m d2dprompt.bench.metrics --compare-anomalib`.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np
import torch
import typer
from tqdm import tqdm

from d2dprompt.core.eval import metrics
from d2dprompt.core.runtime.config import EvaluateParams

app = typer.Typer(add_completion=False)


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One defect: an ellipse, a lobed blob or a scratch, 1 px to ~40% of the image across."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    kind = rng.choice(["ellipse", "blob", "scratch"], p=[0.4, 0.35, 0.25])
    if kind == "scratch":
        length, angle = rng.uniform(0.1, 0.6) * size, rng.uniform(0, np.pi)
        half_width = rng.uniform(0.5, 2.5)
        dy, dx = np.sin(angle), np.cos(angle)
        along = (yy - cy) * dy + (xx - cx) * dx
        across = -(yy - cy) * dx + (xx - cx) * dy
        return (np.abs(along) <= length / 2) & (np.abs(across) <= half_width)
    radius = size * np.exp(rng.uniform(np.log(0.006), np.log(0.2)))
    angle = np.arctan2(yy - cy, xx - cx)
    if kind == "ellipse":
        ratio, tilt = rng.uniform(0.3, 1.0), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(tilt) + (yy - cy) * np.sin(tilt)
        v = -(xx - cx) * np.sin(tilt) + (yy - cy) * np.cos(tilt)
        return (u / radius) ** 2 + (v / (radius * ratio)) ** 2 <= 1.0
    lobes = rng.integers(3, 7)
    wobble = 1.0 + 0.35 * np.sin(lobes * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= radius * wobble


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cell: int) -> torch.Tensor:
    coarse = torch.from_numpy(rng.standard_normal((n, 1, size // cell + 1, size // cell + 1), dtype=np.float32))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def make_workload(n: int = 1725, size: int = 256, anomalous: float = 0.7, seed: int = 0):
    """(masks bool (n, size, size), maps float32 (n, size, size)) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in tqdm(np.flatnonzero(rng.random(n) < anomalous), desc="masks", leave=False):
        for _ in range(rng.integers(1, 5)):
            masks[i] |= _shape_mask(rng, size)
    # the defect signal is the mask blurred over ~4 px (area-downsampled x4, bilinear back up)
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(masks).float()[:, None], 4)
    signal = torch.nn.functional.interpolate(blurred, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    strength = torch.from_numpy(rng.uniform(0.5, 4.0, (n, 1, 1)).astype(np.float32))
    logits = (
        _smooth_noise(rng, n, size, 32)
        + 0.5 * _smooth_noise(rng, n, size, 8)
        + 0.1 * torch.from_numpy(rng.standard_normal((n, size, size), dtype=np.float32))
        + strength * signal
        - 1.5
    )
    return masks, torch.sigmoid(logits).numpy()


def _load_anomalib_aupro():
    """anomalib's AUPRO metric class, and how it was loaded.

    PyPI's torchvision wheels link CUDA builds of torch, so next to a CPU torch they fail to import,
    and torchmetrics imports torchvision whenever it is installed: uninstall it from the anomalib
    environment. `anomalib.data` (needed by `import anomalib`) still wants torchvision, so in that case
    the metric modules are loaded without running the package __init__ files, with a stand-in for
    `anomalib.data` (whose `Batch` only annotates methods the benchmark does not call).
    """
    try:
        from anomalib.metrics.aupro import _AUPRO

        return _AUPRO, "import"
    except ImportError:
        pass
    spec = importlib.util.find_spec("anomalib")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'anomalib'")
    for name in [name for name in sys.modules if name == "anomalib" or name.startswith("anomalib.")]:
        del sys.modules[name]
    root = Path(spec.submodule_search_locations[0])
    for name, folder in (("anomalib", ""), ("anomalib.metrics", "metrics"), ("anomalib.utils", "utils")):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = [str(root / folder)]
    sys.modules["anomalib.data"] = types.ModuleType("anomalib.data")
    sys.modules["anomalib.data"].Batch = object
    from anomalib.metrics.aupro import _AUPRO

    return _AUPRO, "its module file (package __init__ skipped: torchvision unavailable)"


def _timed(label: str, fn, *args):
    """fn(*args) and its wall-clock seconds; CPU seconds are printed too (they show sharing of the cores)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    value = fn(*args)
    seconds = time.perf_counter() - start
    typer.echo(f"{label:<38s} {seconds:8.2f} s  (cpu {time.process_time() - cpu_start:6.2f} s)")
    return value, seconds


def time_uncertainty(n: int, size: int, fpr_limit: float, seed: int) -> None:
    """What evaluate adds per category and method: exact AUPIMO, then the intervals of all four metrics."""
    from d2dprompt.core.eval.bootstrap import bootstrap_intervals
    from d2dprompt.core.eval.pimo import aupimo

    ev = EvaluateParams()
    masks, maps = make_workload(n, size, seed=seed)
    labels = masks.any(axis=(1, 2))
    scores = maps.reshape(n, -1).max(axis=1)
    typer.echo(f"one category: {n} maps {size}x{size} float32, {labels.sum()} anomalous, {(~labels).sum() * size * size} normal pixels")
    result, _ = _timed("AUPIMO (exact)", aupimo, masks, maps, tuple(ev.aupimo_fpr))
    typer.echo(f"  AUPIMO {result.mean:.6f} over {result.num_points} thresholds in FPR {ev.aupimo_fpr}")
    intervals, _ = _timed(f"intervals, 4 metrics x {ev.bootstrap} resamples",
                          lambda: bootstrap_intervals(labels, scores, masks, maps, n_resamples=ev.bootstrap, seed=ev.bootstrap_seed,
                                                      confidence=ev.confidence, fpr_limit=fpr_limit, pimo_bounds=tuple(ev.aupimo_fpr)))
    for name, iv in intervals.items():
        typer.echo(f"  {name}: {iv.value:.4f} [{iv.lo:.4f}, {iv.hi:.4f}]")
    typer.echo(f"max RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


@app.command()
def main(
    n: int = typer.Option(1725, help="maps in the workload (MVTec AD test set: 1,725)"),
    size: int = typer.Option(256, help="map side in pixels (anomalib evaluates at 256)"),
    fpr_limit: float = typer.Option(EvaluateParams().aupro_fpr_limit, help="AUPRO integration limit (evaluate.aupro_fpr_limit)"),
    seed: int = typer.Option(0, help="workload seed"),
    repeat: int = typer.Option(3, min=1, help="runs of pixel_metrics; shared machines make single timings noisy"),
    compare_sort: bool = typer.Option(False, help="also time one global sort / argsort of all pixel scores"),
    compare_sklearn: bool = typer.Option(False, help="also time scikit-learn on the flattened pixels"),
    compare_anomalib: bool = typer.Option(False, help="also time anomalib's AUPRO (needs anomalib importable)"),
    uncertainty: int = typer.Option(0, help="instead: time AUPIMO and the bootstrap intervals (evaluate.bootstrap resamples) on one category of this many maps (MVTec AD's largest test set: 167)"),
) -> None:
    if uncertainty:
        time_uncertainty(uncertainty, size, fpr_limit, seed)
        return
    start = time.perf_counter()
    masks, maps = make_workload(n, size, seed=seed)
    _, n_regions = metrics.label_regions(masks)
    typer.echo(
        f"workload: {n} maps {size}x{size} float32, {masks.any(axis=(1, 2)).mean():.0%} anomalous images, "
        f"{masks.mean():.2%} anomalous pixels, {n_regions} regions (built in {time.perf_counter() - start:.1f} s)"
    )
    runs = [_timed("pixel_metrics (AUROC+AP+F1Max+AUPRO)", metrics.pixel_metrics, masks, maps, fpr_limit)]
    runs += [_timed("  again", metrics.pixel_metrics, masks, maps, fpr_limit) for _ in range(repeat - 1)]
    values, seconds = runs[0][0], [run[1] for run in runs]
    typer.echo(f"  best {min(seconds):.2f} s, median {np.median(seconds):.2f} s of {repeat} runs")
    typer.echo("  " + ", ".join(f"{k}={v:.6f}" for k, v in values.items()))
    # the same work, step by step
    scores, anomalous = metrics._as_scores(maps, "maps"), masks.ravel()
    positive_index, _ = _timed("  positives (flatnonzero)", np.flatnonzero, anomalous)
    weights, _ = _timed("  regions + PRO weights (8-conn.)", metrics._pro_weights, masks, positive_index)
    curve, _ = _timed("  ranking pass (shared)", metrics._rank, scores, anomalous, weights)
    _timed("  AUROC from ranks", metrics._auroc, curve)
    _timed("  AP from ranks", metrics._average_precision, curve)
    _timed("  F1Max from ranks", metrics._f1_max, curve)
    _timed("  AUPRO from ranks", metrics._aupro, curve, fpr_limit)
    ours, aupro_seconds = _timed("aupro() alone", metrics.aupro, masks, maps, fpr_limit)

    tracemalloc.start()
    metrics.pixel_metrics(masks, maps, fpr_limit)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    typer.echo(f"peak memory of pixel_metrics (tracemalloc): {peak / 2**20:.0f} MiB on top of its inputs "
               f"(maps {maps.nbytes / 2**20:.0f} MiB, masks {masks.nbytes / 2**20:.0f} MiB)")

    tracemalloc.start()
    _, curve_seconds = _timed("pixel_curves (evaluate's pooled plots)", metrics.pixel_curves, masks, maps)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    typer.echo(f"peak memory of pixel_curves (tracemalloc): {peak / 2**20:.0f} MiB on top of its inputs")

    if compare_sort:
        _timed("np.sort of all scores (reference)", np.sort, maps.ravel())
        _timed("np.argsort of all scores (reference)", np.argsort, maps.ravel())

    if compare_sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        flat_labels, flat_scores = masks.ravel(), maps.ravel()
        auroc, _ = _timed("sklearn roc_auc_score", roc_auc_score, flat_labels, flat_scores)
        ap, _ = _timed("sklearn average_precision_score", average_precision_score, flat_labels, flat_scores)
        typer.echo(f"  |diff| AUROC {abs(auroc - values['pixel_AUROC']):.2e}, AP {abs(ap - values['pixel_AP']):.2e}")
        from sklearn.metrics import precision_recall_curve, roc_curve

        tracemalloc.start()
        _timed("sklearn roc_curve + precision_recall_curve", lambda: (roc_curve(flat_labels, flat_scores), precision_recall_curve(flat_labels, flat_scores)))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        typer.echo(f"peak memory of scikit-learn's curves (tracemalloc, the plots before pixel_curves): {peak / 2**20:.0f} MiB")
    if compare_anomalib:
        try:
            _AUPRO, how = _load_anomalib_aupro()
        except ImportError as err:
            typer.echo(f"anomalib not importable here ({err}); run with a Python that has it")
        else:
            typer.echo(f"anomalib's _AUPRO loaded by {how}")
            metric = _AUPRO(fpr_limit=fpr_limit)
            metric.update(torch.from_numpy(maps), torch.from_numpy(masks).int())
            theirs, seconds = _timed("anomalib AUPRO", lambda: float(metric.compute()))
            typer.echo(f"  anomalib {theirs:.6f} vs ours {ours:.6f}: |diff| {abs(theirs - ours):.2e}, "
                       f"time ratio anomalib/ours {seconds / aupro_seconds:.1f}x")
    typer.echo(f"max RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    app()
