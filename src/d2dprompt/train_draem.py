"""python -m d2dprompt.train --method draem  (dvc.yaml: train@draem)

DRAEM as its authors train it: one model per category, from scratch, on the normal training images
of `evaluate.datasets` (DRAEM is trained on the data it is tested on, never on its test or validation
images, whatever `train.datasets` / `train.supervision` say for the prompt methods). Every epoch each
image is drawn afresh: with probability `draem.anomaly_share` it gets a synthetic anomaly from
synth.py (Perlin mask, anomaly-source texture of latents.texture_dir, DRAEM's beta), otherwise it stays
normal; draws are a pure function of (latents.seed, image, epoch), so a rerun is identical. Adam with
`draem.lr`, multiplied by 0.2 at 80 % and 90 % of `draem.epochs` (the paper's schedule). All
categories' weights go into one model.safetensors, keyed `<dataset>/<category>/...`.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
import typer

from d2dprompt.config import Params
from d2dprompt.latent_store import LatentRow, read_index
from d2dprompt.models import autocast, pick_device
from d2dprompt.outputs import atomic_file, write_json
from d2dprompt.prompt_files import CONFIG_FILE, WEIGHTS_FILE, config_record
from d2dprompt.row_images import load_textures, real_image, synthetic_variant, to_unit
from d2dprompt.train import HISTORY_FILE, epoch_batches, optimise, write_history


def category_rows(latents_root: Path, datasets: list[str]) -> dict[str, list[LatentRow]]:
    """'<dataset>/<category>' -> its normal training images (split train, real: not the validation split)."""
    groups: dict[str, list[LatentRow]] = {}
    for name in datasets:
        for row in read_index(latents_root / name):
            if row.split == "train" and row.source == "real" and row.label == 0:
                groups.setdefault(f"{name}/{row.category}", []).append(row)
    if not groups:
        raise ValueError(f"{latents_root}: no normal training images in {datasets}")
    return dict(sorted(groups.items()))


class DraemBatches:
    """Clean images of one category, and each epoch's fresh anomalies of them, at draem.image_size."""

    def __init__(self, root: Path, rows: list[LatentRow], cfg: Params):
        size = cfg.draem.image_size
        self.images = [real_image(root, r.image_path, "", 0, size)[0] for r in rows]  # a category fits in memory
        self.keys = [f"draem/{r.image_path}" for r in rows]  # another seed stream than the latents stage's anomalies
        self.cfg, self.textures = cfg, load_textures(cfg.latents.texture_dir)

    def batch(self, idx: list[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(augmented, clean) (B, 3, S, S) in [0, 1] and masks (B, S, S)."""
        augmented, masks = [], []
        for i in idx:
            image, key = self.images[i], self.keys[i]
            coin = np.random.default_rng([self.cfg.latents.seed, zlib.crc32(key.encode()), epoch]).random()
            if coin < self.cfg.draem.anomaly_share:
                out, mask = synthetic_variant(image, key, epoch, self.cfg.latents, self.textures)
            else:
                out, mask = image, np.zeros(image.shape[:2], dtype=bool)
            augmented.append(out)
            masks.append(mask)
        clean = to_unit([self.images[i] for i in idx])
        return to_unit(augmented), clean, torch.from_numpy(np.stack(masks)).float()


def train_category(rows: list[LatentRow], root: Path, cfg: Params, device: torch.device, name: str) -> tuple[dict, list[dict]]:
    from d2dprompt.methods.draem import Draem, draem_loss, step_schedule

    d = cfg.draem
    data = DraemBatches(root, rows, cfg)
    torch.manual_seed(cfg.train.seed)
    model = Draem(d.recon_width, d.disc_width).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=d.lr)
    schedule = step_schedule(optimizer, d.epochs)
    history = []
    for epoch in range(d.epochs):
        def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            augmented, clean, masks = (t.to(device) for t in data.batch(batch.tolist(), epoch))
            with autocast(device, cfg.model.precision):
                out = model(augmented)
            return draem_loss(out, clean, masks)

        batches = epoch_batches(len(rows), d.batch_size, cfg.train.seed, epoch)
        losses = optimise(batches, loss_of, optimizer, f"{name} epoch {epoch + 1}/{d.epochs}")
        schedule.step()
        history.append({"epoch": epoch + 1, **{f"{name}/{k}": v for k, v in losses.items()}})
    return {f"{name}/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, history


def run(cfg: Params, latents_root: Path, downloads_root: Path, out: Path, log=None) -> list[dict[str, float]]:
    from safetensors.torch import save_file

    device = pick_device(cfg.model.device)
    groups = category_rows(latents_root, cfg.evaluate.datasets)
    weights: dict[str, torch.Tensor] = {}
    history: dict[int, dict] = {}
    for name, rows in groups.items():
        typer.echo(f"draem {name}: {len(rows)} normal training images")
        state, per_epoch = train_category(rows, downloads_root / name.split("/")[0], cfg, device, name)
        weights.update(state)
        for row in per_epoch:
            history.setdefault(row["epoch"], {"epoch": row["epoch"]}).update(row)
        if log is not None:  # one series per category and term, as the other methods' per-epoch series
            for row in per_epoch:
                log.log_metrics({f"loss_{k}": v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / WEIGHTS_FILE) as tmp:
        save_file(weights, tmp)
    write_json(out / CONFIG_FILE, {**config_record(cfg, "draem"), "categories": list(groups)})
    rows = [history[e] for e in sorted(history)]
    write_history(rows, out / HISTORY_FILE)
    return rows
