"""python -m d2dprompt.pipeline.evaluate DATASET [--params params.yaml] [--trained stages/train/d2dprompt] [--out stages/evaluate/d2dprompt] [--metrics metrics/d2dprompt]

One method's trained folder (model.json names the method) on a dataset's test split; dvc.yaml runs
one evaluate@<method>-<dataset> per pair. Every method goes through the same splits, threshold fitting,
map post-processing and metric code. Maps: the method's anomaly map -> bilinear to `evaluate.map_size`
-> Gaussian sigma `evaluate.sigma`; image score by `evaluate.score`, or as its authors' own test code computes it
for a method that keeps its own (methods/base.py: own_image_score). Writes
`metrics/<dataset>.json` (image_AUROC, image_AP, image_F1Max, pixel_AUROC, pixel_AP, pixel_AUPRO, and
image_F1 / pixel_F1 at thresholds fitted on the validation split, per category and their mean, plus
the validation split's own image metrics and pixel_AUROC),
`metrics/<dataset>.md` (the same as a table), and under `<out>/<dataset>/`: thresholds.json, scores.csv
(each test image's score and decision), replicas.safetensors (what compare pairs), maps.safetensors (float16 maps), DVC plot data (ROC / PR curves, per-category bars) and one PNG grid per category of best and worst cases.
Under torchrun (dvc.yaml, distributed.nproc > 1) every method's rows are split over the processes, each
scores its share and rank 0 gathers the maps and scores in row order, computes the metrics and writes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer

from d2dprompt.core.runtime import distributed, numerics
from d2dprompt.core.runtime.config import EvaluateParams, ParamsError, flatten
from d2dprompt.methods.base import Scoring
from d2dprompt.params import Params, load_params
from d2dprompt.core.runtime.cli import app_for
from d2dprompt.core.data.images import ImageError, load_mask, load_rgb, resize_mask
from d2dprompt.core.eval.metrics import image_metrics, pixel_metrics, summarize
from d2dprompt.core.eval.uncertainty import aupimo_per_image, category_seed, replica_settings, replicas_of, with_intervals
from d2dprompt.core.data.evaluated import MAPS_FILE, REPLICAS_FILE, Replicated, write_evaluated, write_replicated
from d2dprompt.core.eval.bootstrap import METRICS
from d2dprompt.core.runtime.outputs import atomic_dir, write_json
from d2dprompt.core.eval.report import display_range, write_grids, write_metrics, write_plot_data
from d2dprompt.core.eval.thresholds import Thresholds, binary_masks, f1_at, fit_thresholds

if TYPE_CHECKING:  # torch and the models load when a command runs, not for --help
    import torch

    from d2dprompt.core.data.latent_store import LatentRow
    from d2dprompt.methods.base import Method


SCORES_FILE = "scores.csv"  # one row per test image: what predict must reproduce for the same image
VALIDATION_FILE = "validation.csv"  # one row per validation row the thresholds were fitted on: its key, label and score


def write_scores(path: Path, rows: list[LatentRow], labels: np.ndarray, scores: np.ndarray, threshold: float, aupimo: np.ndarray) -> None:
    """One line per test image: its score and decision, and its AUPIMO (anomalous images; empty for normal ones)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_path", "category", "defect_type", "label", "score", "predicted", "aupimo"])
        for row, label, score, area in zip(rows, labels.tolist(), scores.tolist(), aupimo.tolist()):
            writer.writerow([row.image_path, row.category, row.defect_type, label, repr(float(score)), int(score >= threshold), "" if area != area else repr(area)])


def write_validation(path: Path, rows: list[LatentRow], scores: np.ndarray) -> None:
    """The rows the thresholds were fitted on (held-out normal images and their synthetic anomalies), with their scores."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "category", "source", "label", "score"])
        for row, score in zip(rows, scores.tolist()):
            writer.writerow([row.key, row.category, row.source, row.label, repr(float(score))])


def ground_truth(root: Path, rows: list[LatentRow], size: int) -> np.ndarray:
    """(N, size, size) bool masks of real images; normal images, and anomalous ones without pixel truth
    (`without_pixel_truth`), get empty masks."""
    masks = np.zeros((len(rows), size, size), dtype=bool)
    for i, row in enumerate(rows):
        if row.mask_path:
            shape = load_rgb(root / row.image_path).shape[:2]
            masks[i] = resize_mask(load_mask(root / row.mask_path, shape), size)
    return masks


def without_pixel_truth(rows: list) -> set[str]:
    """The categories with an anomalous image but no mask for it (no ground_truth/): their pixel metrics are n/a,
    since an empty mask would count the defect's pixels as normal ones."""
    return {r.category for r in rows if r.label and not r.mask_path}


def validation_masks(packed: torch.Tensor, size: int) -> np.ndarray:
    """Unpack the latents stage's bit-packed (square) validation masks and resize them to `size`."""
    masks = np.unpackbits(packed.numpy(), axis=-1, count=packed.shape[1]).astype(bool)
    return np.stack([resize_mask(m, size) for m in masks]) if masks.shape[-1] != size else masks


def validation_thresholds(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, ev: EvaluateParams) -> Thresholds:
    """F1-max image and pixel thresholds on the validation split, saying which rows they came from."""
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("validation split holds one class only; raise latents.val_fraction or use evaluate.threshold=fixed")
    source = (
        f"F1-max on the validation split ({int((labels == 0).sum())} held-out normal training images + "
        f"{int(labels.sum())} synthetic anomalies), never the test split"
    )
    return fit_thresholds(labels, scores, masks, maps, source, ev.opening_kernel, ev.min_area)


def bootstrap_note(ev: EvaluateParams) -> str:
    if not ev.bootstrap:
        return ""
    return (f"[lo, hi]: {ev.confidence:.0%} percentile bootstrap interval over the test images ({ev.bootstrap} resamples, "
            f"stratified by label, seed {ev.bootstrap_seed}); the mean's interval resamples every category at once. AUPIMO: mean over "
            f"anomalous images of the recall integrated over FPR {ev.aupimo_fpr[0]:g} to {ev.aupimo_fpr[1]:g} on normal images (log scale).")


Scorer = Callable[[list[int], str], tuple[np.ndarray, np.ndarray]]  # row indices, progress label -> (maps, scores)


def method_scorer(method: Method, model, record: dict, latents_dir: Path, download_dir: Path, cfg: Params, device: torch.device) -> tuple[Scorer, list[LatentRow], dict]:
    """The rows of the dataset and a function scoring any of them with the trained method: its inputs (stored latents,
    or the rows' pixels at the size it was trained at) in batches of evaluate.batch_size, one category per batch for a
    method with a model per category, a whole category per call for one that scores images together; results in the
    order asked."""
    import torch
    from tqdm import tqdm

    from d2dprompt.core.data.latent_store import category_key, read_latents
    from d2dprompt.core.data.row_images import RowImages

    ev = cfg.evaluate
    tensors, rows = read_latents(latents_dir)  # the validation masks come from here for every method
    keys = [category_key(latents_dir.name, row.category) for row in rows]
    batch_score = method.scorer(model, record, Scoring.of(cfg.evaluate, cfg.loss, cfg.model), device)
    if method.inputs(record) == "pixels":
        data = RowImages([download_dir] * len(rows), rows, cfg.latents, cfg.model.image_size, method.input_size(record))
        inputs = lambda chunk: data.batch(chunk)[0]  # noqa: E731
    else:
        inputs = lambda chunk: tensors["latents"][chunk]  # noqa: E731

    def score(idx: list[int], desc: str) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = torch.zeros(len(idx), ev.map_size, ev.map_size), torch.zeros(len(idx))
        together = method.scores_together(record)  # batch zero-shot: a category's images are each other's reference
        groups: dict[object, list[int]] = {}
        twin_free = twin_free_groups([rows[i] for i in idx]) if together else [0] * len(idx)
        for position, row in enumerate(idx):
            groups.setdefault((keys[row], twin_free[position]) if method.per_category or together else None, []).append(position)
        bar = tqdm(total=len(idx), desc=desc, unit="img", disable=not distributed.is_main())
        for where in groups.values():
            step = len(where) if together else ev.batch_size
            for start in range(0, len(where), step):
                chunk = where[start : start + step]
                chosen = [idx[p] for p in chunk]
                maps[chunk], scores[chunk] = batch_score(inputs(chosen), [keys[i] for i in chosen])
                bar.update(len(chunk))
        bar.close()
        return maps.numpy(), scores.numpy()

    return score, rows, tensors


def twin_free_groups(rows: list[LatentRow]) -> list[int]:
    """A group number per row such that no group holds two versions of one image (the real one and its synthetic
    anomalies, `<image>#syn<k>`): scored together, a synthetic anomaly would find its own source as a near-twin, which
    no test image has, and thresholds fitted on such maps would sit too low. Version v of a category's i-th image goes
    to group (i + v) mod the versions, so each group mixes real and synthetic rows and holds one version of every
    image; rows without variants (the test split) all share group 0."""
    from d2dprompt.core.data.latent_store import SYNTHETIC_MARK

    sources: dict[tuple[str, str], int] = {}
    per_category: dict[str, int] = {}
    versions = 1 + max((int(r.key.rsplit(SYNTHETIC_MARK, 1)[1]) + 1 for r in rows if SYNTHETIC_MARK in r.key), default=0)
    groups = []
    for row in rows:
        source, _, k = row.key.partition(SYNTHETIC_MARK)
        if (row.category, source) not in sources:
            sources[(row.category, source)] = per_category.get(row.category, 0)
            per_category[row.category] = sources[(row.category, source)] + 1
        groups.append((sources[(row.category, source)] + (int(k) + 1 if k else 0)) % versions)
    # a category with one image has nothing else to compare with: its versions stay together
    return [0 if per_category[row.category] < 2 else g for row, g in zip(rows, groups)]


def shared_out(score: Scorer, block: int) -> Scorer:
    """`score` split over the processes (distributed.py): each scores its share of the rows asked for (whole
    batches of `block`), and rank 0 gets every row's maps and scores in the order asked (the others None, None)."""
    if distributed.world_size() == 1:
        return score

    def score_share(idx: list[int], desc: str) -> tuple[np.ndarray, np.ndarray]:
        part = distributed.shard(len(idx), block)
        maps, scores = score(idx[part.start : part.stop], desc) if len(part) else (None, None)
        return distributed.gather(maps), distributed.gather(scores)

    return score_share


def score_splits(score: Scorer, rows: list[LatentRow], latents_dir: Path, ev: EvaluateParams) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
    """Score what evaluate reads: the validation split (when thresholds are fitted on it), then the test
    images; progress label -> (row indices, maps, scores)."""
    test = [i for i, r in enumerate(rows) if r.split == "test" and r.source == "real"]
    val = [i for i, r in enumerate(rows) if r.split == "val"]
    if ev.threshold != "fixed" and not val:
        raise ValueError(f"{latents_dir}: no validation rows; set latents.val_fraction > 0 or evaluate.threshold=fixed")
    splits = {"test maps": test} if ev.threshold == "fixed" else {"validation maps": val, "test maps": test}
    return {desc: (idx, *score(idx, desc)) for desc, idx in splits.items()}


def evaluate_dataset(scored: dict[str, tuple[list[int], np.ndarray, np.ndarray]], rows: list[LatentRow], tensors: dict, download_dir: Path, ev: EvaluateParams):
    """Metrics per category + mean, the thresholds, and the arrays behind them (for pictures), from score_splits' maps."""
    thresholds = Thresholds(ev.sensitivity, ev.sensitivity, "fixed evaluate.sensitivity")
    validation: dict[str, float] = {}
    display = (0.0, 1.0)  # fixed thresholds live on the [0, 1] map scale; fitted ones take the validation maps' range
    if "validation maps" in scored:
        val, val_maps, val_scores = scored["validation maps"]
        val_rows = [rows[i] for i in val]
        val_masks = validation_masks(tensors["val_masks"], ev.map_size)
        val_labels = np.array([r.label for r in val_rows])
        thresholds = validation_thresholds(val_labels, val_scores, val_masks, val_maps, ev)
        display = display_range(val_maps)
        validation = {**image_metrics(val_labels, val_scores), "pixel_AUROC": pixel_metrics(val_masks, val_maps, ev.aupro_fpr_limit)["pixel_AUROC"]}
    test, maps, scores = scored["test maps"]
    test_rows = [rows[i] for i in test]
    masks = ground_truth(download_dir, test_rows, ev.map_size)
    labels = np.array([r.label for r in test_rows])
    predicted = binary_masks(maps, thresholds.pixel, ev.opening_kernel, ev.min_area)
    unmasked = without_pixel_truth(test_rows)
    per_category, replicated = category_metrics(test_rows, labels, scores, masks, maps, predicted, thresholds, ev, unmasked)
    # a folder of normal images only (no test/) still gets its thresholds, for predict, the API and the app
    notes = [f"no test images in {c}: its metrics need <category>/test/" for c in sorted({r.category for r in rows} - {r.category for r in test_rows})]
    validation_rows = [rows[i] for i in scored["validation maps"][0]] if "validation maps" in scored else []
    validation_scores = scored["validation maps"][2] if "validation maps" in scored else np.zeros(0)
    details = {"validation_rows": validation_rows, "validation_scores": validation_scores, "rows": test_rows, "maps": maps, "masks": masks, "predicted": predicted, "scores": scores, "labels": labels, "validation": validation, "display_range": display,
               "replicated": replicated, "notes": replicated.notes + notes, "unmasked": unmasked}
    return with_intervals(summarize(per_category), replicated.replicas, ev.confidence), thresholds, details


def category_metrics(rows: list, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, predicted: np.ndarray,
                     thresholds: Thresholds, ev: EvaluateParams, unmasked: set[str] = frozenset()) -> tuple[dict[str, dict[str, float]], Replicated]:
    """Each category's metrics of the test rows (anything with .image_path and .category), and what compare reads:
    the exact values of the metrics it pairs, their bootstrap replicas, each image's AUPIMO. The
    `unmasked` categories have no pixel truth: their pixel metrics are n/a."""
    per_category, replicas, notes = {}, {}, []
    per_image_aupimo = np.full(len(rows), np.nan)
    for index, category in enumerate(sorted({r.category for r in rows})):
        idx = np.array([i for i, r in enumerate(rows) if r.category == category])
        pixels = category not in unmasked
        if pixels:
            mean_aupimo, per_image_aupimo[idx], why = aupimo_per_image(masks[idx], maps[idx], ev.aupimo_fpr)
            pixel_values = {**pixel_metrics(masks[idx], maps[idx], fpr_limit=ev.aupro_fpr_limit), "AUPIMO": mean_aupimo}
        else:
            why = "its anomalous images have no masks (no ground_truth/)"
            pixel_values = dict.fromkeys(("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO", "AUPIMO"), float("nan"))
            notes.append(f"pixel metrics n/a for {category}: {why}")
        if pixels and why and labels[idx].min() != labels[idx].max():
            notes.append(f"AUPIMO n/a for {category}: {why}")
        per_category[category] = {
            **image_metrics(labels[idx], scores[idx]),
            **pixel_values,
            "image_F1": f1_at(labels[idx] == 1, scores[idx] >= thresholds.image),
            "pixel_F1": f1_at(masks[idx], predicted[idx]) if pixels else float("nan"),
        }
        if ev.bootstrap:  # the seed follows the category, not the method: every method draws the same images
            replicas[category] = replicas_of(labels[idx], scores[idx], masks[idx], maps[idx], n_resamples=ev.bootstrap,
                                             seed=category_seed(ev.bootstrap_seed, index), fpr_limit=ev.aupro_fpr_limit,
                                             fpr_bounds=ev.aupimo_fpr, with_aupimo=why is None, with_pixels=pixels)
    exact = {c: {m: values[m] for m in METRICS} for c, values in per_category.items()}
    replicated = Replicated([r.image_path for r in rows], [r.category for r in rows], np.asarray(labels, dtype=np.uint8), per_image_aupimo,
                            exact, replicas, notes, replica_settings(ev))
    return per_category, replicated


def main(
    dataset: str = typer.Argument(..., help="a dataset prepared by the download stage"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    trained: Path = typer.Option(Path("stages/train/d2dprompt"), "--trained", "--prompts", help="a train@<method> output (model.json names the method)"),
    latents: Path = typer.Option(Path("stages/latents"), help="latents stage output"),
    downloads: Path = typer.Option(Path("stages/download"), help="download stage output"),
    out: Path = typer.Option(Path("stages/evaluate/d2dprompt"), help="pictures and plot data go to <out>/<dataset>/"),
    metrics: Path = typer.Option(Path("metrics/d2dprompt"), help="<metrics>/<dataset>.json and .md"),
) -> None:
    from d2dprompt.trained import load_trained

    try:
        cfg = load_params(params)
        ev = cfg.evaluate
        with distributed.process_group(cfg.distributed, cfg.model.device):
            device = distributed.device(cfg.model.device)
            model, record, chosen = load_trained(trained)
            method = chosen.name
            chosen.place(model, device)
            with distributed.main_run("evaluate", {**flatten(cfg), "evaluate.dataset": dataset, "method": method}) as log:
                log.set_tags(numerics.machine_tags(str(device)))
                score, rows, tensors = method_scorer(chosen, model, record, latents / dataset, downloads / dataset, cfg, device)
                scored = score_splits(shared_out(score, ev.batch_size), rows, latents / dataset, ev)
                if not distributed.is_main():  # its share of the maps went to rank 0, which computes and writes the rest
                    return
                summary, thresholds, details = evaluate_dataset(scored, rows, tensors, downloads / dataset, ev)
                threshold_record = {**asdict(thresholds), "method": method, "score": chosen.image_score_name(ev.score), "top_percent": ev.top_percent, "map_size": ev.map_size, "sigma": ev.sigma, "opening_kernel": ev.opening_kernel, "min_area": ev.min_area, "display_range": list(details["display_range"])}
                if len(details["validation_scores"]):  # the normalised score's scale (serve/detector.py): anomalib's min-max
                    threshold_record["score_range"] = [float(details["validation_scores"].min()), float(details["validation_scores"].max())]
                unmasked = details["unmasked"]  # their empty masks are unknown, not normal: no pixel curve
                truth = np.array([r.category not in unmasked for r in details["rows"]], dtype=bool)
                with atomic_dir(out / dataset) as tmp:
                    write_json(tmp / "thresholds.json", threshold_record)
                    write_scores(tmp / SCORES_FILE, details["rows"], details["labels"], details["scores"], thresholds.image, details["replicated"].aupimo)
                    write_evaluated(tmp / MAPS_FILE, details["rows"], details["labels"], details["scores"], details["maps"], details["masks"], unmasked)
                    write_replicated(tmp / REPLICAS_FILE, details["replicated"])
                    write_validation(tmp / VALIDATION_FILE, details["validation_rows"], details["validation_scores"])
                    pixels = (details["masks"], details["maps"]) if truth.all() else (details["masks"][truth], details["maps"][truth])
                    write_plot_data(tmp / "plots", details["labels"], details["scores"], *pixels, summary)
                    write_grids(tmp / "grids", downloads / dataset, details["rows"], details["maps"], details["masks"], details["predicted"], details["scores"], details["labels"], ev.grid_cases,
                                details["display_range"], thresholds, f"{method} {dataset}")
                # `validation` (synthetic anomalies on held-out normal images) is where choices such as
                # evaluate.score are made without looking at the test split
                write_metrics(metrics, dataset, summary, asdict(thresholds), details["validation"], bootstrap_note(ev), details["notes"],
                              numerics.record(str(device)))
                log.log_dataset(dataset, latents / dataset / "index.csv", "evaluation")
                log.log_metrics({f"{method}.{dataset}.{cat}.{name}": v for cat, values in summary.items() for name, v in values.items() if v == v})
                log.log_artifact(metrics / f"{dataset}.json")
                log.log_artifact(metrics / f"{dataset}.md")
                log.log_artifacts(out / dataset, "evaluate")
                log_detector(log, trained, params, out / dataset / "thresholds.json", f"{method}-{dataset}")
        typer.echo(f"{method} {dataset}: " + (" ".join(f"{k}={v:.4f}" for k, v in summary["mean"].items())
                                               or f"no test images; thresholds fitted ({thresholds.source}) for predict"))
    except (ParamsError, ImageError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def log_detector(log, trained: Path, params: Path, thresholds: Path, name: str) -> None:
    """The trained folder as the MLflow model `detector` (serve/mlflow_model.py) in this run, deciding at the
    thresholds just fitted, registered as `name`; nothing when untracked."""
    if getattr(log, "run_id", None) is None:
        return
    from d2dprompt.serve.mlflow_detector import log_detector as log_model

    log.retry(log_model, log.client, log.run_id, Path(trained), Path(params), Path(thresholds), name)


if __name__ == "__main__":
    app_for(main, __doc__)()
