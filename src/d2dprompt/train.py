"""python -m d2dprompt.train [--params params.yaml] [--latents stages/latents] [--out stages/train]

Trains only the prompt vectors (AnomalyCLIP-style context + deep compound prompts) so the frozen UNet's
cross-attention maps segment defects. Supervision (`train.supervision`): `synthetic` = the latents
stage's Perlin anomalies plus the normal training images of `train.datasets`; `annotated` = the real
defects and masks of the test split of auxiliary datasets (the zero-shot protocol: train on VisA,
evaluate on MVTec AD, and vice versa). Writes `prompts.safetensors` (prompt parameters only),
`prompts.json` (the config that produced them) and `history.csv` (per-epoch losses); a checkpoint per
epoch lets an interrupted run resume with the same params.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import torch
import typer
from tqdm import tqdm

from d2dprompt.config import Params, ParamsError, flatten, load_params
from d2dprompt.latent_store import read_latents
from d2dprompt.prompt_files import CONFIG_FILE, PROMPTS_FILE, config_record, save_prompts
from d2dprompt.losses import LOSS_NAMES, total_loss
from d2dprompt.models import load_frozen, pick_device
from d2dprompt.outputs import atomic_file
from d2dprompt.segmenter import D2DSegmenter, build_segmenter, fixed_noise

HISTORY_FILE, CHECKPOINT_FILE = "history.csv", "checkpoint.pt"


def training_set(latents_root: Path, datasets: list[str], supervision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(latents, latent-size masks, labels, keys) concatenated over `datasets`."""
    if supervision not in ("synthetic", "annotated"):
        raise ParamsError(f"train.supervision={supervision!r}: expected synthetic or annotated")
    parts = []
    for name in datasets:
        tensors, rows = read_latents(latents_root / name)
        if supervision == "synthetic":
            keep = [i for i, r in enumerate(rows) if r.split == "train"]
        else:
            keep = [i for i, r in enumerate(rows) if r.split == "test" and r.source == "real"]
        if not keep:
            raise ValueError(f"{latents_root / name}: no {supervision} training rows")
        idx = torch.tensor(keep)
        parts.append((tensors["latents"][idx], tensors["masks"][idx], tensors["labels"][idx], [f"{name}/{rows[i].key}" for i in keep]))
    latents = torch.cat([p[0] for p in parts]).float()
    masks = torch.cat([p[1] for p in parts]).float()
    labels = torch.cat([p[2] for p in parts]).float()
    keys = [k for p in parts for k in p[3]]
    return latents, masks, labels, keys


def fingerprint(record: dict, latents_root: Path, datasets: list[str]) -> str:
    """Params + training data: a checkpoint resumes only a run with both unchanged."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for name in datasets:
        with (latents_root / name / "latents.safetensors").open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


def train_epoch(
    segmenter: D2DSegmenter,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]],
    cfg: Params,
    epoch: int,
    device: torch.device,
) -> dict[str, float]:
    latents, masks, labels, keys = data
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch))
    weights = {name: getattr(cfg.loss, name) for name in LOSS_NAMES}
    sums: dict[str, float] = {}
    batches = list(order.split(cfg.train.batch_size))
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch", leave=False)
    for batch in bar:
        noise = fixed_noise([keys[i] for i in batch], tuple(latents.shape[1:]), cfg.model.noise_seed)
        maps = segmenter(latents[batch].to(device), noise.to(device))
        loss, values = total_loss(maps, masks[batch].to(device), labels[batch].to(device), weights, cfg.loss.focal_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values["total"] = float(loss.detach())
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value * len(batch)
        bar.set_postfix(loss=f"{values['total']:.4f}")
    return {name: total / len(keys) for name, total in sums.items()}


def write_history(history: list[dict[str, float]], path: Path) -> None:
    names = ["epoch"] + sorted({k for row in history for k in row if k != "epoch"})
    with atomic_file(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)


def run(cfg: Params, latents_root: Path, out: Path, log=None) -> list[dict[str, float]]:
    """Train (resuming from a matching checkpoint) and write the outputs; returns the per-epoch history."""
    device = pick_device(cfg.model.device)
    record = config_record(cfg)
    run_id = fingerprint(record, latents_root, cfg.train.datasets)
    data = training_set(latents_root, cfg.train.datasets, cfg.train.supervision)
    sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed).to(device)
    torch.manual_seed(cfg.train.seed)
    segmenter = build_segmenter(sd, cfg.prompt, cfg.attention, cfg.model).to(device)
    optimizer = torch.optim.Adam(segmenter.prompts.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    history: list[dict[str, float]] = []
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["fingerprint"] == run_id:
            segmenter.prompts.load_state_dict(state["prompts"])
            optimizer.load_state_dict(state["optimizer"])
            history = state["history"]
            typer.echo(f"resuming after epoch {len(history)} from {checkpoint}")
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(len(history), cfg.train.epochs):
        losses = train_epoch(segmenter, optimizer, data, cfg, epoch, device)
        history.append({"epoch": epoch + 1, **losses})
        typer.echo(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        if log is not None:
            log.log_metrics({f"loss_{k}": v for k, v in losses.items()}, step=epoch + 1)
        state = {"fingerprint": run_id, "prompts": segmenter.prompts.state_dict(), "optimizer": optimizer.state_dict(), "history": history}
        with atomic_file(checkpoint) as tmp:
            torch.save(state, tmp)
    save_prompts(segmenter, record, out)
    write_history(history, out / HISTORY_FILE)
    return history


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    latents: Path = typer.Option(Path("stages/latents"), help="latents stage output"),
    out: Path = typer.Option(Path("stages/train"), help="where prompts and history go"),
) -> None:
    from d2dprompt.tracking import start_run

    try:
        cfg = load_params(params)
        with start_run("train", flatten(cfg)) as log:
            history = run(cfg, latents, out, log)
            if history:
                log.log_metrics({f"final_loss_{k}": v for k, v in history[-1].items() if k != "epoch"})
            log.log_artifact(out / PROMPTS_FILE)
            log.log_artifact(out / CONFIG_FILE)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    typer.run(main)
