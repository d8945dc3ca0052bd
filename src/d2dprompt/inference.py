"""The one path from images or stored latents to anomaly maps and image scores; evaluate and predict share it.

So the same image gets the same score everywhere: latents are rounded to the dtype the latents stage
stores them in (LATENT_DTYPE), the UNet runs under the same autocast (`model.precision`), and the
noise is the seed's one draw (segmenter.fixed_noise), whatever the image is called.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from d2dprompt.config import EvaluateParams
from d2dprompt.latent_store import LATENT_DTYPE
from d2dprompt.maps import finish_maps
from d2dprompt.models import autocast, encode
from d2dprompt.segmenter import D2DSegmenter, fixed_noise


def encode_images(segmenter: D2DSegmenter, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 images at the model's size -> latents exactly as the latents stage stores them."""
    return encode(segmenter.sd, images, device).to(LATENT_DTYPE)


@torch.no_grad()
def anomaly_maps(
    segmenter: D2DSegmenter,
    latents: torch.Tensor,
    noise_seed: int,
    ev: EvaluateParams,
    device: torch.device,
    precision: str,
    image_top_percent: float,
    desc: str = "maps",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, map_size, map_size) float32 maps and (N,) image scores, in batches of `ev.batch_size`."""
    maps, scores = [], []
    for start in tqdm(range(0, latents.shape[0], ev.batch_size), desc=desc, unit="batch", disable=not progress):
        batch = latents[start : start + ev.batch_size].float().to(device)
        noise = fixed_noise(batch.shape[0], tuple(batch.shape[1:]), noise_seed).to(device)
        with autocast(device, precision):
            latent_map = segmenter(batch, noise)["anomaly"]
        full, score = finish_maps(latent_map, ev.map_size, ev.sigma, ev.score, ev.top_percent, image_top_percent)
        maps.append(full.cpu())
        scores.append(score.cpu())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()
