"""python -m d2dprompt.train --method anomalyclip  (dvc.yaml: train@anomalyclip)

AnomalyCLIP's prompts trained on the same rows as D2D-Prompt: `train.supervision: synthetic` reads the
latents stage's training rows (normal images + the same synthetic anomalies, redrawn by row_images.py),
`annotated` the real defects of the test split of `train.datasets` (zero-shot protocol). The images go
to the frozen CLIP at `anomalyclip.image_size`; only the prompt vectors learn (prompt block), with the
train block's optimiser, epochs, batch and seed and the loss block's focal / dice / image weights.
Checkpoints and resume as for D2D-Prompt (checkpoints.py): bit for bit, deleted once finished.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer

from d2dprompt.checkpoints import TrainState, code_digest, fingerprint, load_state, save_state
from d2dprompt.config import Params
from d2dprompt.latent_store import LatentRow, read_index
from d2dprompt.models import autocast, pick_device
from d2dprompt.prompt_files import build_anomalyclip, config_record, save_prompts
from d2dprompt.row_images import RowImages
from d2dprompt.train import HISTORY_FILE, epoch_batches, optimise, write_history


def training_rows(latents_root: Path, downloads_root: Path, datasets: list[str], supervision: str) -> tuple[list[Path], list[LatentRow]]:
    """The rows latent_store.training_set picks, with the download folder each image lives in."""
    roots, rows = [], []
    for name in datasets:
        index = read_index(latents_root / name)
        if supervision == "synthetic":
            keep = [r for r in index if r.split == "train"]
        else:
            keep = [r for r in index if r.split == "test" and r.source == "real"]
        if not keep:
            raise ValueError(f"{latents_root / name}: no {supervision} training rows")
        roots += [downloads_root / name] * len(keep)
        rows += keep
    return roots, rows


def run(cfg: Params, latents_root: Path, downloads_root: Path, out: Path, checkpoint: Path, log=None, code: str | None = None) -> list[dict[str, float]]:
    from d2dprompt.methods.anomalyclip import anomalyclip_loss, normalize

    device = pick_device(cfg.model.device)
    record = config_record(cfg, "anomalyclip")
    data_files = [latents_root / name / "index.csv" for name in cfg.train.datasets]
    run_id = fingerprint(record, data_files, code if code is not None else code_digest())
    roots, rows = training_rows(latents_root, downloads_root, cfg.train.datasets, cfg.train.supervision)
    data = RowImages(roots, rows, cfg, cfg.anomalyclip.image_size)
    torch.manual_seed(cfg.train.seed)
    model = build_anomalyclip(cfg).to(device)
    optimizer = torch.optim.Adam(model.prompts.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    history: list[dict[str, float]] = []
    state = load_state(checkpoint)
    if state is not None and state.fingerprint == run_id:
        model.prompts.load_state_dict(state.prompts)
        optimizer.load_state_dict(state.optimizer)
        history = state.history
        typer.echo(f"resuming after epoch {len(history)} from {checkpoint}")
    elif state is not None:
        typer.echo(f"{checkpoint}: left by a run with other params, data or code; training from scratch")
    out.mkdir(parents=True, exist_ok=True)
    weights = {"focal": cfg.loss.focal, "dice": cfg.loss.dice, "image": cfg.loss.image}
    if cfg.train.untrained:
        typer.echo("train.untrained: true: writing the initial prompts without optimising them")
    for epoch in range(len(history), 0 if cfg.train.untrained else cfg.train.epochs):
        def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            images, masks, labels = (t.to(device) for t in data.batch(batch.tolist()))
            with autocast(device, cfg.model.precision):
                output = model(normalize(images))
            return anomalyclip_loss(output, masks, labels, focal_gamma=cfg.loss.focal_gamma, **weights)

        batches = epoch_batches(len(data), cfg.train.batch_size, cfg.train.seed, epoch)
        losses = optimise(batches, loss_of, optimizer, f"epoch {epoch + 1}/{cfg.train.epochs}")
        history.append({"epoch": epoch + 1, **losses})
        save_state(TrainState(run_id, model.prompts.state_dict(), optimizer.state_dict(), history), checkpoint)
        typer.echo(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        if log is not None:
            log.log_metrics({f"loss_{k}": v for k, v in losses.items()}, step=epoch + 1)
    save_prompts(model, record, out)
    write_history(history, out / HISTORY_FILE)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return history
