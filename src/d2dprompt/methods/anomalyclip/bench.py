"""AnomalyCLIP's benchmark (python -m d2dprompt.bench.methods): one training step and inference on random images, at
the paper's size (CLIP ViT-L/14@336's published architecture with random weights, images at 518 px, batch 8, as the
authors train) or the embedded default's; speed does not depend on the weights."""

from __future__ import annotations

import numpy as np
import torch

from d2dprompt.core.models import autocast
from d2dprompt.core.runtime.timing import timed

# openai/clip-vit-large-patch14-336's config.json: text 768 wide, 12 layers, 12 heads; vision 1024 wide, 24 layers, 16 heads
PAPER = {"image_size": 518, "batch_size": 8, "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
         "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336), "projection_dim": 768}
TINY_SIZE = {"image_size": 112, "batch_size": 8}  # the embedded defaults (params.yaml's anomalyclip block, train.batch_size)


def paper_clip():
    from transformers import CLIPConfig, CLIPModel

    from d2dprompt.core.models import bundled_clip_tokenizer
    from d2dprompt.methods.anomalyclip.model import _freeze

    tokenizer = bundled_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **PAPER["text"]),
        vision_config=dict(patch_size=14, hidden_act="quick_gelu", **PAPER["vision"]),
        projection_dim=PAPER["projection_dim"],
    )
    torch.manual_seed(0)
    return _freeze(CLIPModel(config)), tokenizer


def benchmark(scale: str, device: torch.device, precision: str, steps: int) -> dict:
    from d2dprompt.core.models import bundled_clip_tokenizer
    from d2dprompt.methods.anomalyclip.model import AnomalyCLIP, anomalyclip_loss, build_tiny_clip, normalize

    size, batch = (PAPER["image_size"], PAPER["batch_size"]) if scale == "paper" else (TINY_SIZE["image_size"], TINY_SIZE["batch_size"])
    clip, tokenizer = paper_clip() if scale == "paper" else (build_tiny_clip(0, size), bundled_clip_tokenizer())
    torch.manual_seed(0)
    model = AnomalyCLIP(clip, tokenizer).to(device)
    model.clip.to(device)
    optimizer = torch.optim.Adam(model.prompts.parameters(), lr=1e-3, betas=(0.5, 0.999))
    images = normalize(torch.rand(batch, 3, size, size, device=device))
    masks = (torch.rand(batch, size, size, device=device) > 0.9).float()
    labels = (torch.arange(batch, device=device) % 2).float()
    losses = []
    warmup = 1 if (scale, device.type) == ("paper", "cpu") else 2  # a CPU step at 518 px takes minutes

    def step() -> None:
        with autocast(device, precision):
            out = model(images)
        loss, _ = anomalyclip_loss(out, masks, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    _, train_ms = timed(step, warmup, steps, device)
    with torch.no_grad():
        text = model.text_features()  # fixed after training: computed once, as evaluate scores

        def infer() -> None:
            with autocast(device, precision):
                model(images, text)

        _, infer_ms = timed(infer, warmup, steps, device)
    return {
        "image_size": size, "batch": batch, "parameters_M": sum(p.numel() for p in model.prompts.parameters()) / 1e6,
        "frozen_M": sum(p.numel() for p in model.clip.parameters()) / 1e6,
        "train_step_ms": float(np.median(train_ms)), "infer_ms_per_image": float(np.median(infer_ms)) / batch,
        "loss_first": losses[0], "loss_last": losses[-1],
    }
