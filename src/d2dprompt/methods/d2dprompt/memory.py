"""Few-shot D2D-Prompt: a memory of the frozen UNet's features of k normal images per category, read beside the prompts.

The features are the queries of the captured cross-attention layers (to_q of the hidden states the maps are read
from), taken in the same UNet pass that gives the attention maps, so the memory costs no extra forward at test time.
A test image's memory map is each cell's distance to its nearest memory feature (patch_memory.distance_map), fused
with the prompt map by `fewshot.fusion` after each is normalised on the validation split's normal images. Built once
at the end of train@d2dprompt from the trained prompts (the queries of later layers depend on them), stored in
model.safetensors as `memory/<dataset>/<category>/<layer>` and in model.json as the reference images and statistics.
Batch zero-shot (`fewshot.mutual`) keeps no memory: a category's test images, scored together, are each other's
(patch_memory.mutual_map, MuSc's mutual scoring).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from d2dprompt.methods.patch_memory import distance_map, draw_references, fuse, map_statistics, mutual_map, within_budget

if TYPE_CHECKING:
    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.d2dprompt.model import D2DSegmenter

PREFIX = "memory/"  # model.safetensors keys of the memory; the rest are the prompt vectors


@torch.no_grad()
def maps_and_features(segmenter: D2DSegmenter, latents: torch.Tensor, noise: torch.Tensor,
                      states: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One UNet pass -> (the prompt anomaly map (B, h, w), per captured layer its features (B, HW, heads x d)).
    With paired prompts the first pass (the normal prompt's) gives the features."""
    maps, queries = segmenter.maps_and_queries(latents, noise, states)
    batch = latents.shape[0]
    features = {name: q[:batch].transpose(1, 2).reshape(batch, q.shape[2], -1) for name, q in queries.items()}
    return maps["anomaly"].float(), features


def split_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """model.safetensors -> (the prompts' state, category -> layer -> memory rows)."""
    prompts = {k: v for k, v in weights.items() if not k.startswith(PREFIX)}
    memory: dict[str, dict[str, torch.Tensor]] = {}
    for key, rows in weights.items():
        if key.startswith(PREFIX):
            category, _, layer = key.removeprefix(PREFIX).rpartition("/")
            memory.setdefault(category, {})[layer] = rows
    return prompts, memory


def category_maps(segmenter: D2DSegmenter, memory: dict[str, dict[str, torch.Tensor]], stats: dict[str, dict], weight: float,
                  latents: torch.Tensor, noise: torch.Tensor, categories: list[str]) -> torch.Tensor:
    """(B, h, w) fused maps of a batch; row i is read against the memory of categories[i]."""
    prompt_map, features = maps_and_features(segmenter, latents, noise)
    fused = torch.empty_like(prompt_map)
    for category in dict.fromkeys(categories):
        rows = torch.tensor([i for i, c in enumerate(categories) if c == category], device=latents.device)
        mem = distance_map({n: f[rows] for n, f in features.items()}, memory[category], segmenter.captured, tuple(latents.shape[-2:]))
        fused[rows] = fuse(prompt_map[rows], mem, weight, stats[category]["prompt_stats"], stats[category]["memory_stats"])
    return fused


def mutual_maps(segmenter: D2DSegmenter, stats: dict, weight: float, interval: float, latents: torch.Tensor, noise_seed: int,
                batch_size: int, device: torch.device) -> torch.Tensor:
    """(N, h, w) fused maps of one category's N images scored together: the memory map of each is its mutual map
    against the others. The UNet runs in batches of `batch_size`; the features of all N stay on `device`."""
    prompt_map, features = batched_features(segmenter, latents, noise_seed, batch_size, device)
    mutual = mutual_map(features, segmenter.captured, tuple(latents.shape[-2:]), interval)
    return fuse(prompt_map, mutual, weight, stats.get("prompt_stats", [0.0, 1.0]), stats.get("memory_stats", [0.0, 1.0]))


def batched_features(segmenter: D2DSegmenter, latents: torch.Tensor, noise_seed: int, batch_size: int,
                     device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`maps_and_features` of many stored latents, the UNet run `batch_size` at a time with each image's fixed noise:
    (prompt maps (N, h, w), per layer features (N, HW, D)), on `device`."""
    from d2dprompt.methods.d2dprompt.model import fixed_noise

    parts = []
    for start in range(0, len(latents), batch_size):
        batch = latents[start : start + batch_size].float().to(device)
        parts.append(maps_and_features(segmenter, batch, fixed_noise(batch.shape[0], tuple(batch.shape[1:]), noise_seed).to(device)))
    return torch.cat([p for p, _ in parts]), {name: torch.cat([f[name] for _, f in parts]) for name in segmenter.captured}


def build_memory(segmenter: D2DSegmenter, cfg: CoreParams, latents_root: Path, device: torch.device,
                 echo: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], dict]:
    """The memory of every category of evaluate.datasets: (tensors keyed PREFIX + '<dataset>/<category>/<layer>',
    model.json's `memory`: per category its reference images, memory rows and the fusion's normalisation). Mutual
    scoring keeps no tensor, only the normalisation."""
    from d2dprompt.core.data.latent_store import category_key, is_normal_training, is_normal_validation, read_latents
    from d2dprompt.core.models import autocast

    fs = cfg.fewshot
    tensors, record = {}, {}
    for dataset in cfg.evaluate.datasets:
        stored, rows = read_latents(latents_root / dataset)
        for category in sorted({r.category for r in rows}):
            name = category_key(dataset, category)
            layers, picked = None, []
            if not fs.mutual:
                normal = [i for i, r in enumerate(rows) if r.category == category and is_normal_training(r)]
                picked = draw_references(normal, fs.k, fs.seed, name)
                with autocast(device, cfg.model.precision):
                    _, features = batched_features(segmenter, stored["latents"][picked], cfg.model.noise_seed, cfg.evaluate.batch_size, device)
                layers = within_budget({layer: f.flatten(0, 1).float().cpu() for layer, f in features.items()}, fs.memory_mb, fs.seed)
                tensors.update({f"{PREFIX}{name}/{layer}": values for layer, values in layers.items()})
            val = [i for i, r in enumerate(rows) if r.category == category and is_normal_validation(r)]
            stats = validation_statistics(segmenter, layers, stored["latents"][val], name, cfg, device) if 0 < fs.fusion < 1 else {}
            record[name] = {"references": [rows[i].image_path for i in picked], "rows": sum(len(t) for t in (layers or {}).values()), **stats}
            echo(f"fewshot {name}: " + ("mutual scoring, no memory" if fs.mutual else f"{len(picked)} reference images, {record[name]['rows']} feature rows"))
    return tensors, record


def validation_statistics(segmenter: D2DSegmenter, memory: dict[str, torch.Tensor] | None, latents: torch.Tensor, name: str,
                          cfg: CoreParams, device: torch.device) -> dict[str, list[float]]:
    """[mean, std] of the prompt maps and of the memory maps (mutual maps among them, without a memory) over the
    category's normal validation images `latents`."""
    from d2dprompt.core.models import autocast

    fs = cfg.fewshot
    if len(latents) < (2 if memory is None else 1):
        raise ValueError(f"fewshot.fusion={fs.fusion}: {name} has too few normal validation images ({len(latents)}) to put the prompt and "
                         "memory maps on one scale; raise latents.val_fraction or set fewshot.fusion to 0 or 1")
    with autocast(device, cfg.model.precision):
        prompt_map, features = batched_features(segmenter, latents, cfg.model.noise_seed, cfg.evaluate.batch_size, device)
    hw = tuple(latents.shape[-2:])
    if memory is None:
        memory_map = mutual_map(features, segmenter.captured, hw, fs.interval)
    else:
        memory_map = distance_map(features, {layer: t.to(device) for layer, t in memory.items()}, segmenter.captured, hw)
    return {"prompt_stats": map_statistics(prompt_map.cpu()), "memory_stats": map_statistics(memory_map.cpu())}
