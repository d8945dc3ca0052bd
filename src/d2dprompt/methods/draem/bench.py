"""DRAEM's benchmark (python -m d2dprompt.bench.methods): one training step and inference at the paper's or the
embedded default's size, on random images, and the CPU-side anomaly synthesis per image."""

from __future__ import annotations

import time

import numpy as np
import torch

from d2dprompt.core.models import autocast
from d2dprompt.core.runtime.timing import timed

PAPER = {"image_size": 256, "recon_width": 128, "disc_width": 64, "batch_size": 8}  # the paper's
TINY = {"image_size": 64, "recon_width": 8, "disc_width": 4, "batch_size": 8}  # the embedded defaults (params.yaml)


def benchmark(scale: str, device: torch.device, precision: str, steps: int) -> dict:
    from d2dprompt.core.data.row_images import synthetic_variant
    from d2dprompt.core.runtime.config import LatentsParams
    from d2dprompt.methods.draem.model import Draem, draem_loss

    s = PAPER if scale == "paper" else TINY
    size, batch = s["image_size"], s["batch_size"]
    torch.manual_seed(0)
    model = Draem(s["recon_width"], s["disc_width"]).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    clean = torch.rand(batch, 3, size, size, device=device)
    masks = (torch.rand(batch, size, size, device=device) > 0.9).float()
    losses = []

    def step() -> None:
        with autocast(device, precision):
            out = model(clean)
        loss, _ = draem_loss(out, clean, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    _, train_ms = timed(step, 2, steps, device)
    model.eval()
    with torch.no_grad():
        _, infer_ms = timed(lambda: model(clean), 2, steps, device)
    picture = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    start = time.perf_counter()
    for k in range(8):
        synthetic_variant(picture, "bench.png", k, LatentsParams(), [])
    synth_ms = (time.perf_counter() - start) * 1000 / 8
    return {
        "image_size": size, "batch": batch, "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_step_ms": float(np.median(train_ms)), "infer_ms_per_image": float(np.median(infer_ms)) / batch,
        "cpu_synthesis_ms_per_image": synth_ms, "loss_first": losses[0], "loss_last": losses[-1],
    }
