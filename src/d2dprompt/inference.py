"""The one path from images or stored latents to anomaly maps and image scores; evaluate and predict share it.

D2D-Prompt, D2D and DeCo-Diff read stored latents (`anomaly_maps`, `decodiff_maps`); AnomalyCLIP and DRAEM
read pixels (`anomalyclip_maps`, `draem_maps`). All end in the same map post-processing (maps.to_image_size: bilinear to evaluate.map_size, Gaussian
evaluate.sigma), so thresholds and metrics treat every method alike.

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
from d2dprompt.maps import finish_maps, to_image_size
from d2dprompt.models import autocast, encode, encode_with
from d2dprompt.row_images import to_unit
from d2dprompt.methods.d2dprompt import D2DSegmenter, fixed_noise


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


@torch.no_grad()
def anomalyclip_maps(
    model, images: torch.Tensor, ev: EvaluateParams, device: torch.device, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of images in [0, 1] -> (maps at evaluate.map_size, image scores as AnomalyCLIP's test.py)."""
    from d2dprompt.methods.anomalyclip import image_score, normalize

    with autocast(device, precision):
        out = model(normalize(images).to(device))
    return to_image_size(out["anomaly_map"].float(), ev.map_size, ev.sigma).cpu(), image_score(out).float().cpu()


@torch.no_grad()
def draem_maps(model, images: torch.Tensor, ev: EvaluateParams, device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One category's DRAEM on images in [0, 1] -> (maps at evaluate.map_size, the authors' image scores).

    The image score is read off the network's own map (max of its mean-filtered softmax, as the
    authors' test code does); the pixel map gets the same post-processing as every method's.
    """
    from d2dprompt.methods.draem import anomaly_map, image_score

    with autocast(device, precision):
        out = model(images.to(device))
    amap = anomaly_map(out).float()
    return to_image_size(amap, ev.map_size, ev.sigma).cpu(), image_score(amap).float().cpu()


@torch.no_grad()
def decodiff_maps(model, latents: torch.Tensor, classes: torch.Tensor, reverse_steps: int, ev: EvaluateParams, device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of stored latents -> (maps at evaluate.map_size, DeCo-Diff's image scores: the max of its own map).

    Both the latent and its repainting are decoded by the VAE, so the pixel term compares two decodings
    (the VAE's own reconstruction error cancels), as the authors' evaluation does.
    """
    from d2dprompt.methods.decodiff import anomaly_map, image_score
    from d2dprompt.models import decode_with

    latents = latents.float().to(device)
    with autocast(device, precision):
        repainted = model.repaint(latents, classes.to(device), reverse_steps)
        pixels, repainted_pixels = decode_with(model.vae, latents), decode_with(model.vae, repainted)
    amap = anomaly_map(pixels, repainted_pixels, latents, repainted)
    return to_image_size(amap, ev.map_size, ev.sigma).cpu(), image_score(amap).float().cpu()


def row_maps(score_batch, data, idx: list[int], group_of, ev: EvaluateParams, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixel methods on rows of a row_images.RowImages, in batches of `ev.batch_size` within each group
    (`group_of(row index)` picks the model: one for AnomalyCLIP, one per category for DRAEM); results in `idx` order.
    """
    maps = torch.zeros(len(idx), ev.map_size, ev.map_size)
    scores = torch.zeros(len(idx))
    positions: dict[object, list[int]] = {}
    for position, row in enumerate(idx):
        positions.setdefault(group_of(row), []).append(position)
    bar = tqdm(total=len(idx), desc=desc, unit="img")
    for group, where in positions.items():
        for start in range(0, len(where), ev.batch_size):
            chunk = where[start : start + ev.batch_size]
            images, _, _ = data.batch([idx[p] for p in chunk])
            maps[chunk], scores[chunk] = score_batch(group, images)
            bar.update(len(chunk))
    bar.close()
    return maps.numpy(), scores.numpy()


OWN_SCORE = ("anomalyclip", "draem", "decodiff")  # methods scored as their authors' code scores images


def image_score_name(method: str, score: str) -> str:
    """What thresholds.json records as the image score: evaluate.score for the D2D family, else the method's own."""
    return method if method in OWN_SCORE else score


def input_size(record: dict) -> int:
    """The side a trained folder's model reads images at."""
    method = record.get("method", "d2dprompt")
    return record[method]["image_size"] if method in ("anomalyclip", "draem") else record["model"]["image_size"]


def category_index(record: dict, category: str | None) -> int:
    """Which of a run's categories ('<dataset>/<category>') draem's model or decodiff's class label is; may be
    left out when the run trained one."""
    names = record["categories"]
    if category is None and len(names) == 1:
        category = names[0]
    if category not in names:
        raise ValueError(f"{record['method']} knows its categories: choose --category from {' | '.join(names)}")
    return names.index(category)


def image_scorer(model, record: dict, ev: EvaluateParams, device: torch.device, precision: str, image_top_percent: float, category: str | None = None):
    """images (uint8, already at `input_size(record)`) -> (maps, scores), exactly as evaluate scores its rows."""
    if record.get("method") == "decodiff":
        label = category_index(record, category)

        def score_decodiff(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            latents = encode_with(model.vae, images, device).to(LATENT_DTYPE)  # rounded as the latents stage stores them
            classes = torch.full((len(images),), label)
            maps, scores = decodiff_maps(model, latents, classes, record["decodiff"]["reverse_steps"], ev, device, precision)
            return maps.numpy(), scores.numpy()
        return score_decodiff
    if record.get("method") == "draem":
        chosen = model[str(category_index(record, category))]

        def score_draem(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            maps, scores = draem_maps(chosen, to_unit(images), ev, device, precision)
            return maps.numpy(), scores.numpy()
        return score_draem
    if record.get("method") == "anomalyclip":
        def score(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            maps, scores = anomalyclip_maps(model, to_unit(images), ev, device, precision)
            return maps.numpy(), scores.numpy()
        return score

    def score_latents(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        latents = encode_images(model, images, device)
        return anomaly_maps(model, latents, record["model"]["noise_seed"], ev, device, precision, image_top_percent, progress=False)
    return score_latents
