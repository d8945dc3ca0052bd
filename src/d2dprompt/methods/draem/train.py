"""train@draem (python -m d2dprompt.pipeline.train --method draem): DRAEM as its authors train it.

One model per category, from scratch, on the normal training images of `evaluate.datasets` (DRAEM is trained on the
data it is tested on, never on its test or validation images, whatever `train.datasets` / `train.supervision` say
for the prompt methods). Every epoch each image is drawn afresh, as the authors' data loader does: with probability
`draem.rotation_share` it is first rotated by U(-90, 90) degrees (bilinear, black corners: imgaug's Affine), then
with probability `draem.anomaly_share` it gets a synthetic anomaly from synth.py (Perlin mask, anomaly-source texture
of latents.texture_dir, DRAEM's beta), otherwise it stays normal; the rotated image is the reconstruction target.
Every draw is a pure function of (latents.seed, image, epoch), so a rerun is identical, and `draem.workers`
DataLoader processes draw them beside the training without changing a bit. Adam with `draem.lr`, multiplied by 0.2 at
80 % and 90 % of `draem.epochs` (the paper's schedule). All categories' weights go into one model.safetensors, keyed
`<dataset>/<category>/...`. A checkpoint per category every `draem.checkpoint_every` epochs (`<checkpoint>/<index>/`)
lets a killed run resume bit for bit: finished categories are kept, the one in training goes on from its last save.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from d2dprompt.core.data.latent_store import LatentRow, category_key, is_normal_training, read_index
from d2dprompt.core.data.row_images import load_textures, real_image, synthetic_variant
from d2dprompt.core.models import autocast, pick_device
from d2dprompt.core.runtime.checkpoints import TrainState, code_digest, fingerprint, save_state
from d2dprompt.core.runtime.config import LatentsParams
from d2dprompt.core.training import epoch_batches, optimise, resume, write_trained
from d2dprompt.methods.base import TrainJob, config_record

if TYPE_CHECKING:
    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.base import Method

ROTATION_DEGREES = 90.0  # the authors' iaa.Affine(rotate=(-90, 90))


def category_rows(latents_root: Path, datasets: list[str]) -> dict[str, list[LatentRow]]:
    """'<dataset>/<category>' -> its normal training images (split train, real: not the validation split)."""
    groups: dict[str, list[LatentRow]] = {}
    for name in datasets:
        for row in filter(is_normal_training, read_index(latents_root / name)):
            groups.setdefault(category_key(name, row.category), []).append(row)
    if not groups:
        raise ValueError(f"{latents_root}: no normal training images in {datasets}")
    return dict(sorted(groups.items()))


def rotated(image: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """`image` rotated by U(-90, 90) degrees with probability `share` (bilinear, corners black), else as it is."""
    if rng.random() >= share:
        return image
    angle = rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)
    return np.array(Image.fromarray(image).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)))


class DraemDraws(torch.utils.data.Dataset):
    """Item (image index, epoch) -> (augmented, clean) uint8 (S, S, 3) and the bool mask (S, S): that image's draw for
    that epoch, a pure function of (latents.seed, image, epoch), wherever it is computed (`as_unit` turns a batch of
    them into the networks' inputs)."""

    def __init__(self, images: list[np.ndarray], keys: list[str], latents: LatentsParams, anomaly_share: float, rotation_share: float):
        self.images, self.keys, self.latents = images, keys, latents
        self.anomaly_share, self.rotation_share = anomaly_share, rotation_share
        self.textures = load_textures(latents.texture_dir)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i, epoch = item
        key, crc = self.keys[i], zlib.crc32(self.keys[i].encode())
        image = rotated(self.images[i], np.random.default_rng([self.latents.seed, crc, epoch, 1]), self.rotation_share)
        coin = np.random.default_rng([self.latents.seed, crc, epoch]).random()
        if coin < self.anomaly_share:
            out, mask = synthetic_variant(image, key, epoch, self.latents, self.textures)
        else:
            out, mask = image, np.zeros(image.shape[:2], dtype=bool)
        return out, image, mask


def as_unit(augmented: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A collated batch of draws -> (augmented, clean) (B, 3, S, S) in [0, 1] and float masks (B, S, S), laid out as
    row_images.to_unit lays images out (the memory layout picks the convolution kernels, so it decides the last bits)."""
    return augmented.permute(0, 3, 1, 2).float() / 255, clean.permute(0, 3, 1, 2).float() / 255, masks.float()


def draws_loader(draws: DraemDraws, batches: list[torch.Tensor], first_epoch: int, workers: int):
    """The batches of every epoch from `first_epoch` on, in training order, drawn by `workers` processes ahead."""
    order = [[(int(i), epoch) for i in batch] for epoch, epoch_batch in enumerate(batches) if epoch >= first_epoch for batch in epoch_batch]
    return iter(torch.utils.data.DataLoader(draws, batch_sampler=order, num_workers=workers, persistent_workers=False))


def train_category(method: Method, rows: list[LatentRow], root: Path, cfg: CoreParams, device: torch.device, name: str,
                   checkpoint: Path, run_id: str, job: TrainJob) -> tuple[dict, list[dict]]:
    from d2dprompt.methods.draem.model import Draem, draem_loss, step_schedule

    d = cfg.draem
    images = [real_image(root, r.image_path, "", 0, d.image_size)[0] for r in rows]  # a category fits in memory
    draws = DraemDraws(images, [f"draem/{r.image_path}" for r in rows], cfg.latents, d.anomaly_share, d.rotation_share)  # another seed stream than the latents stage's
    torch.manual_seed(cfg.train.seed)
    model = method.place(Draem(d.recon_width, d.disc_width), device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=d.lr)
    schedule = step_schedule(optimizer, d.epochs)
    history: list[dict[str, float]] = []
    state = resume(checkpoint, run_id, job.echo)
    if state is not None:
        model.load_state_dict(state.weights)
        optimizer.load_state_dict(state.optimizer)
        history = state.history
        schedule.last_epoch = len(history)  # its steps so far; the learning rate itself came back with the optimiser
    batches = [epoch_batches(len(rows), d.batch_size, cfg.train.seed, epoch) for epoch in range(d.epochs)]
    loader = draws_loader(draws, batches, len(history), d.workers) if len(history) < d.epochs else None
    for epoch in range(len(history), d.epochs):
        def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            augmented, clean, masks = (t.to(device) for t in as_unit(*next(loader)))  # the draws of this very batch
            with autocast(device, cfg.model.precision):
                out = model(augmented)
            return draem_loss(out, clean, masks)

        losses = optimise(batches[epoch], loss_of, optimizer, f"{name} epoch {epoch + 1}/{d.epochs}")
        schedule.step()
        history.append({"epoch": epoch + 1, **{f"{name}/{k}": v for k, v in losses.items()}})
        if (epoch + 1) % d.checkpoint_every == 0 or epoch + 1 == d.epochs:
            save_state(TrainState(run_id, model.state_dict(), optimizer.state_dict(), history), checkpoint)
        if job.log is not None:  # one series per category and term, as the other methods' per-epoch series
            job.log.log_metrics({f"loss_{k}": v for k, v in history[-1].items() if k != "epoch"}, step=epoch + 1)
    return {f"{name}/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, history


def run(method: Method, cfg: CoreParams, job: TrainJob) -> list[dict[str, float]]:
    device = pick_device(cfg.model.device)
    groups = category_rows(job.latents, cfg.evaluate.datasets)
    record = config_record(method, cfg, categories=list(groups))
    data_files = [job.latents / name / "index.csv" for name in cfg.evaluate.datasets]
    run_id = fingerprint(record, data_files, job.code if job.code is not None else code_digest())
    weights: dict[str, torch.Tensor] = {}
    history: dict[int, dict] = {}
    for index, (name, rows) in enumerate(groups.items()):
        job.echo(f"draem {name}: {len(rows)} normal training images")
        state, per_epoch = train_category(method, rows, job.downloads / name.split("/")[0], cfg, device, name,
                                          job.checkpoint / f"{index:03d}", run_id, job)
        weights.update(state)
        for row in per_epoch:
            history.setdefault(row["epoch"], {"epoch": row["epoch"]}).update(row)
    rows = [history[e] for e in sorted(history)]
    write_trained(job.out, weights, record, rows)
    shutil.rmtree(job.checkpoint, ignore_errors=True)
    return rows
