"""train@anomalyclip (python -m d2dprompt.pipeline.train --method anomalyclip): AnomalyCLIP's prompts trained on the
same rows as D2D-Prompt.

`train.supervision: synthetic` reads the latents stage's training rows (normal images + the same synthetic
anomalies, redrawn by row_images.py), `annotated` the real defects of the test split of `train.datasets` (zero-shot
protocol). The images go to the frozen CLIP at `anomalyclip.image_size`; only the prompt vectors learn (prompt
block), with the train block's optimiser, epochs, batch and seed and the loss block's focal / dice / image weights.
Checkpoints and resume as for every method (core/training.py): bit for bit, deleted once finished.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from d2dprompt.core.data.latent_store import LatentRow, read_index, supervised
from d2dprompt.core.data.row_images import RowImages
from d2dprompt.core.models import autocast, pick_device
from d2dprompt.core.runtime.checkpoints import TrainState, code_digest, fingerprint, save_state
from d2dprompt.core.training import epoch_batches, optimise, resume, write_trained
from d2dprompt.methods.base import TrainJob, config_record

if TYPE_CHECKING:
    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.base import Method


def training_rows(latents_root: Path, downloads_root: Path, datasets: list[str], supervision: str) -> tuple[list[Path], list[LatentRow]]:
    """The rows latent_store.training_set picks, with the download folder each image lives in."""
    roots, rows = [], []
    for name in datasets:
        index = read_index(latents_root / name)
        keep = [index[i] for i in supervised(index, supervision)]
        if not keep:
            raise ValueError(f"{latents_root / name}: no {supervision} training rows")
        roots += [downloads_root / name] * len(keep)
        rows += keep
    return roots, rows


def run(method: Method, cfg: CoreParams, job: TrainJob) -> list[dict[str, float]]:
    from d2dprompt.methods.anomalyclip.model import anomalyclip_loss, normalize

    device = pick_device(cfg.model.device)
    record = config_record(method, cfg)
    data_files = [job.latents / name / "index.csv" for name in cfg.train.datasets]
    run_id = fingerprint(record, data_files, job.code if job.code is not None else code_digest())
    roots, rows = training_rows(job.latents, job.downloads, cfg.train.datasets, cfg.train.supervision)
    data = RowImages(roots, rows, cfg.latents, cfg.model.image_size, cfg.anomalyclip.image_size)
    torch.manual_seed(cfg.train.seed)
    model = method.place(method.build(cfg, record), device)  # the CLIP too: it is a plain attribute
    optimizer = torch.optim.Adam(model.prompts.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    history: list[dict[str, float]] = []
    state = resume(job.checkpoint, run_id, job.echo)
    if state is not None:
        model.prompts.load_state_dict(state.weights)
        optimizer.load_state_dict(state.optimizer)
        history = state.history
    weights = {"focal": cfg.loss.focal, "dice": cfg.loss.dice, "image": cfg.loss.image}
    if cfg.train.untrained:
        job.echo("train.untrained: true: writing the initial prompts without optimising them")
    for epoch in range(len(history), 0 if cfg.train.untrained else cfg.train.epochs):
        def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            images, masks, labels = (t.to(device) for t in data.batch(batch.tolist()))
            with autocast(device, cfg.model.precision):
                output = model(normalize(images))
            return anomalyclip_loss(output, masks, labels, focal_gamma=cfg.loss.focal_gamma, **weights)

        batches = epoch_batches(len(data), cfg.train.batch_size, cfg.train.seed, epoch)
        losses = optimise(batches, loss_of, optimizer, f"epoch {epoch + 1}/{cfg.train.epochs}")
        history.append({"epoch": epoch + 1, **losses})
        save_state(TrainState(run_id, model.prompts.state_dict(), optimizer.state_dict(), history), job.checkpoint)
        job.echo(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        if job.log is not None:
            job.log.log_metrics({f"loss_{k}": v for k, v in losses.items()}, step=epoch + 1)
    write_trained(job.out, model.prompts.state_dict(), record, history)
    shutil.rmtree(job.checkpoint, ignore_errors=True)
    return history
