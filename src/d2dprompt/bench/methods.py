"""python -m d2dprompt.bench.methods [--scale paper] [--images 240] [--device auto] [--json PATH]

One training step, an epoch of `--images` images and the per-image inference of every registered method that has a
benchmark (methods/<name>/bench.py: AnomalyCLIP, DRAEM and DeCo-Diff; D2D-Prompt's and D2D's live in bench.steps),
on random inputs, at the papers' settings (`--scale paper`: AnomalyCLIP on CLIP ViT-L/14@336's architecture at
518 px, batch 8; DRAEM at 256 px, widths 128 / 64, batch 8; DeCo-Diff on SD's VAE latents 32x32, batch 128) or at
the embedded defaults (`--scale tiny`). Prints a table; times are wall clock after warm-up
steps, CUDA synchronised.

What an epoch is here: ceil(images / batch) optimiser steps at the median step time, on inputs already prepared
(DRAEM's CPU-side anomaly synthesis, which its training spreads over DataLoader workers, and DeCo-Diff's one-off VAE
encoding are timed on their own, per image). Each row also says how the timed steps' loss moved: they are real steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from d2dprompt.core.runtime.cli import app_for

KEYS = ["method", "image_size", "batch", "parameters_M", "train_step_ms", "epoch_s", "infer_ms_per_image", "cpu_synthesis_ms_per_image",
        "vae_encode_ms_per_image", "loss_first", "loss_last"]


def format_rows(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(KEYS) + " |", "|" + "---|" * len(KEYS)]
    for row in rows:
        cells = [row.get(k, "") for k in KEYS]
        lines.append("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(
    scale: str = typer.Option("paper", help="paper (256 px, the papers' widths and batches) | tiny (the embedded defaults)"),
    images: int = typer.Option(240, min=1, help="normal training images in the synthetic category (an epoch's length)"),
    methods: str = typer.Option("", help="comma-separated registered methods with a benchmark [default: all of them]"),
    steps: int = typer.Option(10, min=1, help="timed training steps per method (after 2 warm-up steps)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the rows as JSON here"),
) -> None:
    from d2dprompt.bench.steps import describe_device
    from d2dprompt.core.models import pick_device
    from d2dprompt.methods import registry

    if scale not in ("paper", "tiny"):
        raise typer.BadParameter(f"--scale: paper | tiny, got {scale!r}")
    dev = pick_device(device)
    known = [m.name for m in registry.methods() if type(m).benchmark is not registry.Method.benchmark]
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or known
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise typer.BadParameter(f"--methods: {' | '.join(known)}, got {unknown[0]!r}")
    rows = []
    for name in chosen:
        row = {"method": name, **registry.get(name).benchmark(scale, dev, precision, steps)}
        row["epoch_s"] = row["train_step_ms"] * math.ceil(images / row["batch"]) / 1000
        rows.append(row)
        typer.echo(f"{name}: done", err=True)
    typer.echo(f"device: {describe_device(dev)}; precision {precision}; {images} images per epoch; scale {scale}")
    typer.echo(format_rows(rows))
    if json_path is not None:
        json_path.write_text(json.dumps({"device": describe_device(dev), "precision": precision, "scale": scale, "images": images, "rows": rows}, indent=1))


if __name__ == "__main__":
    app_for(main, __doc__)()
