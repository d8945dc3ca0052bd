"""python -m d2dprompt.train --method decodiff  (dvc.yaml: train@decodiff)

DeCo-Diff as its authors train it: from scratch, on normal images only, in the frozen VAE's latent space.
The latents are the latents stage's (the same VAE, images and splits as D2D-Prompt): the normal training
rows (split train, real) of `evaluate.datasets`, since DeCo-Diff learns the data it is tested on, never its
test or validation images. One UNet for all categories, told each latent's category ('<dataset>/<category>',
listed in model.json) as the authors' multi-class model. AdamW (`decodiff.lr`, weight decay 1e-4) with a
cosine schedule after `decodiff.warmup_epochs` of linear warm-up, stepped per epoch and reaching its end at
1.5 x `decodiff.epochs`, as the authors' train script. Checkpoints and resume as for D2D-Prompt
(checkpoints.py): every epoch, bit for bit, deleted once finished.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer

from d2dprompt.checkpoints import TrainState, code_digest, fingerprint, load_state, save_state
from d2dprompt.config import Params
from d2dprompt.latent_store import read_latents
from d2dprompt.models import autocast, pick_device
from d2dprompt.outputs import atomic_file, write_json
from d2dprompt.prompt_files import CONFIG_FILE, WEIGHTS_FILE, build_decodiff, config_record
from d2dprompt.train import HISTORY_FILE, epoch_batches, optimise, write_history

WEIGHT_DECAY = 1e-4  # the authors' AdamW
SCHEDULE_SPAN = 1.5  # the authors' cosine runs over 1.5 x epochs: the last epoch still learns


def normal_latents(latents_root: Path, datasets: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(latents, category index per latent, category names '<dataset>/<category>') of the normal training rows."""
    parts, names = [], []
    for name in datasets:
        tensors, rows = read_latents(latents_root / name)
        keep = [i for i, r in enumerate(rows) if r.split == "train" and r.source == "real" and r.label == 0]
        parts += [(tensors["latents"][i].float(), f"{name}/{rows[i].category}") for i in keep]
    if not parts:
        raise ValueError(f"{latents_root}: no normal training latents in {datasets}")
    names = sorted({category for _, category in parts})
    latents = torch.stack([latent for latent, _ in parts])
    classes = torch.tensor([names.index(category) for _, category in parts])
    return latents, classes, names


def run(cfg: Params, latents_root: Path, out: Path, checkpoint: Path, log=None, code: str | None = None) -> list[dict[str, float]]:
    from diffusers.optimization import get_cosine_schedule_with_warmup

    d = cfg.decodiff
    device = pick_device(cfg.model.device)
    latents, classes, names = normal_latents(latents_root, cfg.evaluate.datasets)
    record = {**config_record(cfg, "decodiff"), "categories": names, "latent_shape": list(latents.shape[1:])}
    run_id = fingerprint(record, [latents_root / name / "index.csv" for name in cfg.evaluate.datasets], code if code is not None else code_digest())
    typer.echo(f"decodiff: {len(latents)} normal training latents {tuple(latents.shape[1:])} of {len(names)} categories")
    torch.manual_seed(cfg.train.seed)
    model = build_decodiff(record, cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=d.lr, weight_decay=WEIGHT_DECAY)
    history: list[dict[str, float]] = []
    state = load_state(checkpoint)
    if state is not None and state.fingerprint == run_id:
        model.unet.load_state_dict(state.prompts)
        optimizer.load_state_dict(state.optimizer)  # its param_groups carry the scheduler's initial_lr
        history = state.history
        typer.echo(f"resuming after epoch {len(history)} from {checkpoint}")
    elif state is not None:
        typer.echo(f"{checkpoint}: left by a run with other params, data or code; training from scratch")
    schedule = get_cosine_schedule_with_warmup(optimizer, d.warmup_epochs, int(d.epochs * SCHEDULE_SPAN), last_epoch=len(history) - 1)
    for epoch in range(len(history), d.epochs):
        generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)  # masks, patches, deviations, timesteps

        def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            with autocast(device, cfg.model.precision):
                return model.loss(latents[batch].to(device), classes[batch].to(device), generator)

        batches = epoch_batches(len(latents), d.batch_size, cfg.train.seed, epoch)
        losses = optimise(batches, loss_of, optimizer, f"epoch {epoch + 1}/{d.epochs}")
        schedule.step()
        history.append({"epoch": epoch + 1, **losses})
        save_state(TrainState(run_id, model.unet.state_dict(), optimizer.state_dict(), history), checkpoint)
        if log is not None:
            log.log_metrics({f"loss_{k}": v for k, v in losses.items()}, step=epoch + 1)
    typer.echo(f"decodiff: final mse {history[-1]['mse']:.4f}")
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}, tmp)
    write_json(out / CONFIG_FILE, record)
    write_history(history, out / HISTORY_FILE)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return history
