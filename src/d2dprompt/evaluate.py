"""python -m d2dprompt.evaluate DATASET [--params params.yaml] [--prompts stages/train] [--out stages/evaluate]

Frozen model + learned prompts on a dataset's test split: anomaly maps at `evaluate.map_size`
(bilinear from latent size, Gaussian sigma `evaluate.sigma`), image score = max of the map; writes
`metrics/<dataset>.json` (image_AUROC, image_AP, image_F1Max, pixel_AUROC, pixel_AP, pixel_AUPRO per
category and their mean) and heatmap overlays (image | map | ground truth | overlay) as PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import typer
from tqdm import tqdm

from d2dprompt.config import ParamsError, flatten, load_params
from d2dprompt.images import ImageError, load_mask, load_rgb, resize_mask, resize_rgb
from d2dprompt.latent_store import LatentRow, read_latents
from d2dprompt.maps import image_scores, to_image_size
from d2dprompt.metrics import image_metrics, pixel_metrics, summarize
from d2dprompt.models import pick_device
from d2dprompt.outputs import atomic_dir, write_json
from d2dprompt.segmenter import D2DSegmenter, fixed_noise
from d2dprompt.prompt_files import load_segmenter


@torch.no_grad()
def predict_maps(
    segmenter: D2DSegmenter,
    latents: torch.Tensor,
    keys: list[str],
    noise_seed: int,
    batch_size: int,
    map_size: int,
    sigma: float,
    device: torch.device,
    desc: str = "maps",
) -> torch.Tensor:
    """(N, map_size, map_size) float32 anomaly maps on the CPU, computed in batches."""
    out = []
    for start in tqdm(range(0, len(keys), batch_size), desc=desc, unit="batch"):
        batch = latents[start : start + batch_size].float().to(device)
        noise = fixed_noise(keys[start : start + batch_size], tuple(batch.shape[1:]), noise_seed).to(device)
        maps = segmenter(batch, noise)["anomaly"]
        out.append(to_image_size(maps, map_size, sigma).cpu())
    return torch.cat(out)


def ground_truth(root: Path, rows: list[LatentRow], size: int) -> np.ndarray:
    """(N, size, size) bool masks; normal images get empty masks."""
    masks = np.zeros((len(rows), size, size), dtype=bool)
    for i, row in enumerate(rows):
        if row.mask_path:
            shape = load_rgb(root / row.image_path).shape[:2]
            masks[i] = resize_mask(load_mask(root / row.mask_path, shape), size)
    return masks


def evaluate_dataset(
    segmenter: D2DSegmenter,
    latents_dir: Path,
    download_dir: Path,
    map_size: int,
    sigma: float,
    batch_size: int,
    fpr_limit: float,
    noise_seed: int,
    device: torch.device,
) -> tuple[dict, dict]:
    """Metrics per category + mean, and the arrays behind them (rows, maps, masks, scores) for pictures."""
    tensors, rows = read_latents(latents_dir)
    test = [i for i, r in enumerate(rows) if r.split == "test" and r.source == "real"]
    if not test:
        raise ValueError(f"{latents_dir}: no test images")
    test_rows = [rows[i] for i in test]
    maps = predict_maps(
        segmenter, tensors["latents"][torch.tensor(test)], [r.key for r in test_rows], noise_seed, batch_size, map_size, sigma, device
    )
    scores = image_scores(maps).numpy()
    maps_np = maps.numpy()
    masks = ground_truth(download_dir, test_rows, map_size)
    labels = np.array([r.label for r in test_rows])
    per_category = {}
    for category in sorted({r.category for r in test_rows}):
        idx = np.array([i for i, r in enumerate(test_rows) if r.category == category])
        per_category[category] = {
            **image_metrics(labels[idx], scores[idx]),
            **pixel_metrics(masks[idx], maps_np[idx], fpr_limit=fpr_limit),
        }
    details = {"rows": test_rows, "maps": maps_np, "masks": masks, "scores": scores, "labels": labels}
    return summarize(per_category), details


def write_overlays(details: dict, download_dir: Path, folder: Path, count: int) -> list[Path]:
    """image | anomaly map | ground truth | overlay for the highest-scoring anomalous and normal images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, labels = details["scores"], details["labels"]
    anomalous = [i for i in np.argsort(-scores) if labels[i] == 1][: max(1, count - count // 3)]
    normal = [i for i in np.argsort(-scores) if labels[i] == 0][: count // 3]
    folder.mkdir(parents=True, exist_ok=True)
    vmax = float(details["maps"].max()) or 1.0  # one colour scale for every picture of the dataset
    paths = []
    for i in anomalous + normal:
        row = details["rows"][i]
        size = details["maps"].shape[-1]
        image = resize_rgb(load_rgb(download_dir / row.image_path), size)
        fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
        axes[0].imshow(image)
        axes[1].imshow(details["maps"][i], cmap="jet", vmin=0, vmax=vmax)
        axes[2].imshow(details["masks"][i], cmap="gray", vmin=0, vmax=1)
        axes[3].imshow(image)
        axes[3].imshow(details["maps"][i], cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
        for ax, title in zip(axes, ("image", "anomaly map", "ground truth", "overlay")):
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{row.image_path}  score={scores[i]:.3f}", fontsize=9)
        path = folder / f"{row.image_path.replace('/', '_').rsplit('.', 1)[0]}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(
    dataset: str = typer.Argument(..., help="a dataset prepared by the download stage"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    prompts: Path = typer.Option(Path("stages/train"), help="train stage output"),
    latents: Path = typer.Option(Path("stages/latents"), help="latents stage output"),
    downloads: Path = typer.Option(Path("stages/download"), help="download stage output"),
    out: Path = typer.Option(Path("stages/evaluate"), help="pictures go to <out>/<dataset>/"),
    metrics: Path = typer.Option(Path("metrics"), help="metric JSONs go to <metrics>/<dataset>.json"),
) -> None:
    from d2dprompt.tracking import start_run

    try:
        cfg = load_params(params)
        device = pick_device(cfg.model.device)
        segmenter, _ = load_segmenter(prompts)
        segmenter.sd.to(device)
        segmenter.to(device)
        ev = cfg.evaluate
        with start_run("evaluate", {**flatten(cfg), "evaluate.dataset": dataset}) as log:
            summary, details = evaluate_dataset(
                segmenter, latents / dataset, downloads / dataset, ev.map_size, ev.sigma, ev.batch_size,
                ev.aupro_fpr_limit, cfg.model.noise_seed, device,
            )
            with atomic_dir(out / dataset) as tmp:
                write_overlays(details, downloads / dataset, tmp / "overlays", ev.overlays)
            write_json(metrics / f"{dataset}.json", summary)
            log.log_metrics({f"{dataset}.{cat}.{name}": value for cat, values in summary.items() for name, value in values.items() if value == value})
            log.log_artifact(metrics / f"{dataset}.json")
            log.log_artifacts(out / dataset, "evaluate")
        mean = summary["mean"]
        typer.echo(f"{dataset}: " + " ".join(f"{k}={v:.4f}" for k, v in mean.items()))
    except (ParamsError, ImageError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    typer.run(main)
