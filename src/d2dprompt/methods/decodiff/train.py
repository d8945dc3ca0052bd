"""train@decodiff (python -m d2dprompt.pipeline.train --method decodiff): DeCo-Diff as its authors train it.

From scratch, on normal images only, in the frozen VAE's latent space. The latents are the latents stage's (the same
VAE, images and splits as D2D-Prompt): the normal training rows (split train, real) of `evaluate.datasets`, since
DeCo-Diff learns the data it is tested on, never its test or validation images. One UNet for all categories, told
each latent's category ('<dataset>/<category>', listed in model.json) as the authors' multi-class model. AdamW
(`decodiff.lr`, weight decay 1e-4) with a cosine schedule after `decodiff.warmup_epochs` of linear warm-up, stepped
per epoch and reaching its end at 1.5 x `decodiff.epochs`, as the authors' train script; epoch e (from 0) runs at
the schedule's value at e + 1, so the first epoch learns (lr / warmup_epochs) instead of standing at 0. Checkpoints
and resume as every method's (core/training.py): every epoch, bit for bit, deleted once finished.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from d2dprompt.core.data.latent_store import category_key, is_normal_training, read_latents
from d2dprompt.core.models import autocast, pick_device
from d2dprompt.core.runtime.checkpoints import TrainState, code_digest, fingerprint, save_state
from d2dprompt.core.training import epoch_batches, optimise, resume, write_trained
from d2dprompt.methods.base import TrainJob, config_record

if TYPE_CHECKING:
    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.base import Method

WEIGHT_DECAY = 1e-4  # the authors' AdamW
SCHEDULE_SPAN = 1.5  # the authors' cosine runs over 1.5 x epochs: the last epoch still learns


def normal_latents(latents_root: Path, datasets: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(latents, category index per latent, category names '<dataset>/<category>') of the normal training rows."""
    parts = []
    for name in datasets:
        tensors, rows = read_latents(latents_root / name)
        parts += [(tensors["latents"][i].float(), category_key(name, r.category)) for i, r in enumerate(rows) if is_normal_training(r)]
    if not parts:
        raise ValueError(f"{latents_root}: no normal training latents in {datasets}")
    names = sorted({category for _, category in parts})
    latents = torch.stack([latent for latent, _ in parts])
    classes = torch.tensor([names.index(category) for _, category in parts])
    return latents, classes, names


def warmup_cosine(epoch: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier at step `epoch` of a linear warm-up over `warmup` steps, then a half cosine down
    to 0 at `total` (diffusers' get_cosine_schedule_with_warmup)."""
    if epoch < warmup:
        return epoch / max(1, warmup)
    progress = (epoch - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_schedule(optimizer: torch.optim.Optimizer, warmup: int, epochs: int, done: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Epoch e (from 0) at warmup_cosine(e + 1): the first epoch's rate is lr / warmup, not 0. `done` epochs already run
    (a resumed run's optimiser carries initial_lr in its groups)."""
    total = int(epochs * SCHEDULE_SPAN)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: warmup_cosine(e + 1, warmup, total), last_epoch=done - 1)


def run(method: Method, cfg: CoreParams, job: TrainJob) -> list[dict[str, float]]:
    d = cfg.decodiff
    device = pick_device(cfg.model.device)
    latents, classes, names = normal_latents(job.latents, cfg.evaluate.datasets)
    record = config_record(method, cfg, categories=names, latent_shape=list(latents.shape[1:]))
    run_id = fingerprint(record, [job.latents / name / "index.csv" for name in cfg.evaluate.datasets], job.code if job.code is not None else code_digest())
    job.echo(f"decodiff: {len(latents)} normal training latents {tuple(latents.shape[1:])} of {len(names)} categories")
    torch.manual_seed(cfg.train.seed)
    model = method.place(method.network(cfg, record), device).train()  # stored latents: no VAE to hold
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=d.lr, weight_decay=WEIGHT_DECAY)
    history: list[dict[str, float]] = []
    state = resume(job.checkpoint, run_id, job.echo)
    if state is not None:
        model.unet.load_state_dict(state.weights)
        optimizer.load_state_dict(state.optimizer)  # its param_groups carry the scheduler's initial_lr
        history = state.history
    schedule = lr_schedule(optimizer, d.warmup_epochs, d.epochs, len(history))
    for epoch in range(len(history), d.epochs):
        generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)  # masks, patches, deviations, timesteps

        def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            with autocast(device, cfg.model.precision):
                return model.loss(latents[batch].to(device), classes[batch].to(device), generator)

        batches = epoch_batches(len(latents), d.batch_size, cfg.train.seed, epoch)
        losses = optimise(batches, loss_of, optimizer, f"epoch {epoch + 1}/{d.epochs}")
        schedule.step()
        history.append({"epoch": epoch + 1, **losses})
        save_state(TrainState(run_id, model.unet.state_dict(), optimizer.state_dict(), history), job.checkpoint)
        if job.log is not None:
            job.log.log_metrics({f"loss_{k}": v for k, v in losses.items()}, step=epoch + 1)
    job.echo(f"decodiff: final mse {history[-1]['mse']:.4f}")
    write_trained(job.out, model.unet.state_dict(), record, history)
    shutil.rmtree(job.checkpoint, ignore_errors=True)
    return history
