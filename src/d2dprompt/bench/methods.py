"""python -m d2dprompt.bench.methods [--scale paper] [--images 240] [--device auto] [--json PATH]

One training epoch and the per-image inference of the from-scratch methods, DRAEM and DeCo-Diff, on a
synthetic category of `--images` normal images (MVTec AD's categories hold 60 to 391; 240 is typical),
at the papers' settings (`--scale paper`: 256 px; DRAEM widths 128 / 64, batch 8; DeCo-Diff on SD's VAE
latents 32x32, batch 128) or at the embedded defaults (`--scale tiny`). Prints a table; times are wall
clock after warm-up steps, CUDA synchronised.

What an epoch is here: DRAEM, len / batch optimiser steps on images that already carry their anomalies
(the CPU-side anomaly synthesis is timed on its own, per image, since a GPU run would spread it over
DataLoader workers); DeCo-Diff, len / batch steps on latents the latents stage already encoded (the VAE
encoding is timed on its own, per image: it runs once per dataset, not per epoch).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import typer

from d2dprompt.core.runtime.cli import app_for

from d2dprompt.bench.steps import _sync, describe_device, timed
from d2dprompt.core.models import autocast, pick_device

# DeCo-Diff's UNet_L is LDM's openaimodel UNet; its exact widths are not in the authors' public code, so
# the paper scale uses LDM's class-conditional ImageNet UNet widths (192 x [1, 2, 3, 5]) as the stand-in
PAPER = {
    "image_size": 256,
    "draem": {"recon_width": 128, "disc_width": 64, "batch_size": 8},
    "decodiff": {"channels": [192, 384, 576, 960], "layers_per_block": 2, "batch_size": 128, "vae": "sd"},
}
TINY = {
    "image_size": 128,
    "draem": {"recon_width": 8, "disc_width": 4, "batch_size": 8, "image_size": 64},
    "decodiff": {"channels": [32, 64, 64], "layers_per_block": 1, "batch_size": 16, "vae": "tiny"},
}


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def bench_draem(settings: dict, images: int, device: torch.device, precision: str, steps: int) -> dict:
    from d2dprompt.methods.draem.model import Draem, draem_loss
    from d2dprompt.core.data.row_images import synthetic_variant
    from d2dprompt.core.runtime.config import LatentsParams

    s = settings["draem"]
    size, batch = s.get("image_size", settings["image_size"]), s["batch_size"]
    torch.manual_seed(0)
    model = Draem(s["recon_width"], s["disc_width"]).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    clean = torch.rand(batch, 3, size, size, device=device)
    masks = (torch.rand(batch, size, size, device=device) > 0.9).float()

    def step() -> None:
        with autocast(device, precision):
            out = model(clean)
        loss, _ = draem_loss(out, clean, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    _, train_ms = timed(step, 2, steps, device)
    model.eval()
    with torch.no_grad():
        _, infer_ms = timed(lambda: model(clean), 2, steps, device)
    picture = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    start = time.perf_counter()
    for k in range(8):
        synthetic_variant(picture, "bench.png", k, LatentsParams(), [])
    synth_ms = (time.perf_counter() - start) * 1000 / 8
    steps_per_epoch = math.ceil(images / batch)
    return {
        "method": "draem", "image_size": size, "batch": batch, "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_step_ms": _median(train_ms), "epoch_s": _median(train_ms) * steps_per_epoch / 1000,
        "infer_ms_per_image": _median(infer_ms) / batch, "cpu_synthesis_ms_per_image": synth_ms,
    }


def _vae(kind: str):
    from d2dprompt.core.models import build_sd21_architecture, build_tiny

    return (build_sd21_architecture(0) if kind == "sd" else build_tiny(0)).vae


def bench_decodiff(settings: dict, images: int, device: torch.device, precision: str, steps: int) -> dict:
    from d2dprompt.methods.decodiff.model import DecoDiff, anomaly_map, build_unet
    from d2dprompt.core.models import decode_with
    from d2dprompt.core.vae_factor import factor_of

    s, size = settings["decodiff"], settings["image_size"]
    vae = _vae(s["vae"]).to(device)
    side = size // factor_of(vae.config.block_out_channels)
    batch = s["batch_size"]
    torch.manual_seed(0)
    model = DecoDiff(build_unet(4, side, s["channels"], s["layers_per_block"], 15), 10, 1e-4, 0.1, 0.7, 0.3).to(device).train()
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=1e-4, weight_decay=1e-4)
    latents = torch.randn(batch, 4, side, side, device=device)
    classes = torch.randint(0, 15, (batch,), device=device)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with autocast(device, precision):
            loss, _ = model.loss(latents, classes, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    _, train_ms = timed(step, 2, steps, device)
    model.eval()
    infer_batch = 8  # evaluate.batch_size

    @torch.no_grad()
    def infer() -> None:
        some = latents[:infer_batch]
        with autocast(device, precision):
            repainted = model.repaint(some, classes[:infer_batch], 5)
            anomaly_map(decode_with(vae, some), decode_with(vae, repainted), some, repainted)

    _, infer_ms = timed(infer, 1, max(1, steps // 2), device)
    pixels = torch.rand(infer_batch, 3, size, size, device=device) * 2 - 1
    with torch.no_grad():
        _, encode_ms = timed(lambda: vae.encode(pixels).latent_dist.mean, 1, max(1, steps // 2), device)
    steps_per_epoch = math.ceil(images / batch)
    return {
        "method": "decodiff", "image_size": size, "batch": batch, "parameters_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
        "train_step_ms": _median(train_ms), "epoch_s": _median(train_ms) * steps_per_epoch / 1000,
        "infer_ms_per_image": _median(infer_ms) / infer_batch, "vae_encode_ms_per_image": _median(encode_ms) / infer_batch,
    }


def format_rows(rows: list[dict]) -> str:
    keys = ["method", "image_size", "batch", "parameters_M", "train_step_ms", "epoch_s", "infer_ms_per_image", "cpu_synthesis_ms_per_image", "vae_encode_ms_per_image"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        lines.append("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(
    scale: str = typer.Option("paper", help="paper (256 px, the papers' widths and batches) | tiny (the embedded defaults)"),
    images: int = typer.Option(240, min=1, help="normal training images in the synthetic category (an epoch's length)"),
    methods: str = typer.Option("draem,decodiff", help="comma-separated: draem, decodiff"),
    steps: int = typer.Option(10, min=1, help="timed training steps per method (after 2 warm-up steps)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the rows as JSON here"),
) -> None:
    if scale not in ("paper", "tiny"):
        raise typer.BadParameter(f"--scale: paper | tiny, got {scale!r}")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in ("draem", "decodiff")]
    if unknown:
        raise typer.BadParameter(f"--methods: draem | decodiff, got {unknown[0]!r}")
    settings = PAPER if scale == "paper" else TINY
    dev = pick_device(device)
    benches = {"draem": bench_draem, "decodiff": bench_decodiff}
    rows = []
    for method in chosen:
        rows.append(benches[method](settings, images, dev, precision, steps))
        _sync(dev)
        typer.echo(f"{method}: done", err=True)
    typer.echo(f"device: {describe_device(dev)}; precision {precision}; {images} images per epoch; scale {scale}")
    typer.echo(format_rows(rows))
    if json_path is not None:
        json_path.write_text(json.dumps({"device": describe_device(dev), "precision": precision, "scale": scale, "images": images, "rows": rows}, indent=1))


if __name__ == "__main__":
    app_for(main, __doc__)()
