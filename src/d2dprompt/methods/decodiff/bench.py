"""DeCo-Diff's benchmark (python -m d2dprompt.bench.methods): one training step on stored-size latents, inference
(5 DDIM steps, two VAE decodes, the map) and the one-off VAE encoding per image, at the paper's or the embedded
default's size. The authors' UNet_L is LDM's openaimodel UNet; its exact widths are not in their public code, so the
paper scale uses LDM's class-conditional ImageNet UNet widths (192 x [1, 2, 3, 5]) as the stand-in."""

from __future__ import annotations

import numpy as np
import torch

from d2dprompt.core.models import autocast
from d2dprompt.core.runtime.timing import timed

PAPER = {"image_size": 256, "channels": [192, 384, 576, 960], "layers_per_block": 2, "batch_size": 128, "vae": "sd"}
TINY = {"image_size": 128, "channels": [32, 64, 64], "layers_per_block": 1, "batch_size": 16, "vae": "tiny"}
INFER_BATCH = 8  # evaluate.batch_size


def benchmark(scale: str, device: torch.device, precision: str, steps: int) -> dict:
    from d2dprompt.core.models import build_sd21_architecture, build_tiny, decode_with
    from d2dprompt.core.vae_factor import factor_of
    from d2dprompt.methods.decodiff.model import DecoDiff, anomaly_map, build_unet

    s = PAPER if scale == "paper" else TINY
    size, batch = s["image_size"], s["batch_size"]
    vae = (build_sd21_architecture(0) if s["vae"] == "sd" else build_tiny(0)).vae.to(device)
    side = size // factor_of(vae.config.block_out_channels)
    torch.manual_seed(0)
    model = DecoDiff(build_unet(4, side, s["channels"], s["layers_per_block"], 15), 10, 1e-4, 0.1, 0.7, 0.3).to(device).train()
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=1e-4, weight_decay=1e-4)
    latents = torch.randn(batch, 4, side, side, device=device)
    classes = torch.randint(0, 15, (batch,), device=device)
    losses = []

    def step() -> None:
        generator = torch.Generator().manual_seed(0)  # the same deviations every step: the loss shows the step learns
        with autocast(device, precision):
            loss, _ = model.loss(latents, classes, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    _, train_ms = timed(step, 2, steps, device)
    model.eval()

    @torch.no_grad()
    def infer() -> None:
        some = latents[:INFER_BATCH]
        with autocast(device, precision):
            repainted = model.repaint(some, classes[:INFER_BATCH], 5)
            anomaly_map(decode_with(vae, some), decode_with(vae, repainted), some, repainted)

    _, infer_ms = timed(infer, 1, max(1, steps // 2), device)
    pixels = torch.rand(INFER_BATCH, 3, size, size, device=device) * 2 - 1
    with torch.no_grad():
        _, encode_ms = timed(lambda: vae.encode(pixels).latent_dist.mean, 1, max(1, steps // 2), device)
    return {
        "image_size": size, "batch": batch, "parameters_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
        "train_step_ms": float(np.median(train_ms)), "infer_ms_per_image": float(np.median(infer_ms)) / INFER_BATCH,
        "vae_encode_ms_per_image": float(np.median(encode_ms)) / INFER_BATCH, "loss_first": losses[0], "loss_last": losses[-1],
    }
