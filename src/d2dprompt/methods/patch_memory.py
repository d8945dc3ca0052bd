"""A memory of normal patch features and nearest-neighbour anomaly maps: what few-shot D2D-Prompt (its frozen UNet's
features) and the patchknn method (VAE latents or pixels) share. Pure torch, no I/O.

- `draw_references`: the k normal reference images of a category, a pure function of (seed, category);
- `nearest_distances`: each feature's exact L2 distance to its nearest memory row;
- `coreset`, `within_budget`: PatchCore's greedy k-center subsampling, for a memory over its budget;
- `distance_map`: per layer nearest distances -> latent-size map, layers and levels averaged as the attention maps;
- `mutual_map`: batch zero-shot (MuSc): each image against the other images of its batch, no memory at all;
- `fuse`: the prompt map and the memory map, each normalised on the validation split, weighted.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

CHUNK = 2048  # query rows per distance matrix: 2048 x 16384 fp32 is 128 MB, bounded whatever the memory's size
PROJECTION = 128  # PatchCore's random projection for the coreset's distances (its default, sparse in theirs, dense here)


def draw_references(candidates: list[int], k: int, seed: int, category: str) -> list[int]:
    """`k` of a category's normal training images (`candidates`, their row indices), in row order; k 0 = all of them.
    The draw depends on (seed, category) only, so every method given the same fewshot.seed reads the very same images."""
    if k == 0:
        return list(candidates)
    if k > len(candidates):
        raise ValueError(f"fewshot.k={k}: {category} has only {len(candidates)} normal training images")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(category.encode()))
    return [candidates[i] for i in sorted(torch.randperm(len(candidates), generator=generator)[:k].tolist())]


def nearest_distances(queries: torch.Tensor, memory: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """(N, D), (M, D) -> (N,): the L2 distance of each query to its nearest memory row, in fp32.

    The neighbour is found with the fast matrix-product form |q|^2 + |m|^2 - 2 q.m, then the distance to it is
    recomputed directly, so a query equal to a memory row gets exactly 0 (the product form leaves rounding noise)."""
    queries, memory = queries.float(), memory.float()
    memory_sq = (memory * memory).sum(1)

    def nearest(q: torch.Tensor) -> torch.Tensor:
        closest = ((q * q).sum(1, keepdim=True) + memory_sq - 2 * q @ memory.T).argmin(1)
        return (q - memory[closest]).norm(dim=1)

    if torch.jit.is_tracing():  # an exported graph repeats a loop as often as it ran when traced: one product for any batch
        return nearest(queries)
    parts = [nearest(queries[start : start + chunk]) for start in range(0, queries.shape[0], chunk)]
    return torch.cat(parts) if parts else queries.new_zeros(0)


def coreset(features: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """Indices of `rows` of `features` (M, D) chosen by PatchCore's greedy k-center: start at a seeded row, then
    repeatedly add the row farthest from those chosen (distances on a seeded random projection to 128 dims).
    Every row ends within the returned covering radius of a chosen one; `rows` >= M returns all."""
    if rows >= features.shape[0]:
        return torch.arange(features.shape[0])
    generator = torch.Generator().manual_seed(seed)
    flat = features.float()
    if flat.shape[1] > PROJECTION:
        projection = torch.randn(flat.shape[1], PROJECTION, generator=generator) / PROJECTION**0.5
        flat = flat @ projection.to(flat.device)
    chosen = [int(torch.randint(flat.shape[0], (1,), generator=generator))]
    nearest = (flat - flat[chosen[0]]).norm(dim=1)
    for _ in range(rows - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, (flat - flat[pick]).norm(dim=1))
    return torch.tensor(sorted(chosen))


def rows_within(budget_bytes: float, per_row_bytes: int, total_rows: int) -> int:
    """How many memory rows fit `budget_bytes` (at least one)."""
    return max(1, min(total_rows, int(budget_bytes // per_row_bytes)))


def within_budget(layers: dict[str, torch.Tensor], memory_mb: float, seed: int) -> dict[str, torch.Tensor]:
    """Each layer's (rows, D) memory as it is, or a coreset of it when the whole memory (fp32) exceeds `memory_mb`:
    every layer keeps the same share of its rows."""
    total = sum(t.numel() * 4 for t in layers.values())
    budget = memory_mb * 2**20
    if total <= budget:
        return layers
    share = budget / total
    return {layer: t[coreset(t, rows_within(share * t.numel() * 4, t.shape[1] * 4, len(t)), seed).to(t.device)] for layer, t in layers.items()}


def level_average(cell_maps: dict[str, torch.Tensor], levels: dict[str, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per layer (B, HW) values at latent side / 2**level -> (B, h, w): upsampled bilinearly to the latent size,
    averaged within a level, then over levels (as attention.aggregate_maps averages the attention maps)."""
    height, width = latent_hw
    per_level: dict[int, list[torch.Tensor]] = {}
    for name, level in levels.items():
        values = cell_maps[name].view(-1, 1, height >> level, width >> level)
        if level:
            values = F.interpolate(values, size=(height, width), mode="bilinear", align_corners=False)
        per_level.setdefault(level, []).append(values[:, 0])
    return torch.stack([torch.stack(maps).mean(0) for maps in per_level.values()]).mean(0)


def distance_map(features: dict[str, torch.Tensor], memory: dict[str, torch.Tensor], levels: dict[str, int],
                 latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per layer (name -> (B, HW, D)) the nearest distance of each cell to that layer's memory (M, D), as a
    (B, h, w) map (level_average)."""
    dists = {}
    for name in levels:
        cells = features[name]
        dists[name] = nearest_distances(cells.reshape(-1, cells.shape[-1]), memory[name].to(cells.device)).view(cells.shape[0], -1)
    return level_average(dists, levels, latent_hw)


def mutual_distances(cells: torch.Tensor, interval: float) -> torch.Tensor:
    """MuSc's mutual scoring (Li et al., ICLR 2024) of N images' cells (N, HW, D) -> (N, HW): for a cell of image i,
    its nearest distance to each other image j, sorted over j, and the mean of the smallest `interval` share of them
    (at least one). A defect rarely repeats at the same place in the other images, so its distances stay large, while
    a normal cell finds a close match in most of them; averaging the smallest share, not taking the minimum, keeps one
    other image with the same defect from hiding it."""
    n = cells.shape[0]
    if n < 2:
        raise ValueError("mutual scoring needs at least 2 images of a category scored together")
    keep = max(1, int(interval * (n - 1)))  # MuSc's interval [0, 0.3) of the N - 1 sorted distances, floored
    out = torch.empty(cells.shape[:2], device=cells.device)
    for i in range(n):
        others = torch.stack([nearest_distances(cells[i], cells[j]) for j in range(n) if j != i])  # (N - 1, HW)
        out[i] = others.sort(dim=0).values[:keep].mean(0)
    return out


def mutual_map(features: dict[str, torch.Tensor], levels: dict[str, int], latent_hw: tuple[int, int], interval: float) -> torch.Tensor:
    """`distance_map` with each image's memory being the other images of the batch (mutual_distances)."""
    return level_average({name: mutual_distances(features[name], interval) for name in levels}, levels, latent_hw)


def map_statistics(maps: torch.Tensor) -> list[float]:
    """[mean, std] of every cell of (B, h, w) maps: the normalisation `fuse` applies (std floored: a flat map)."""
    maps = maps.double()
    return [float(maps.mean()), max(float(maps.std(unbiased=False)), 1e-12)]


def fuse(prompt: torch.Tensor, memory: torch.Tensor, weight: float, prompt_stats: list[float], memory_stats: list[float]) -> torch.Tensor:
    """(1 - weight) x the normalised prompt map + weight x the normalised memory map. The two live on different
    scales (attention shares in [0, 1], feature distances unbounded), so each is first made (map - mean) / std with
    its statistics on the validation split's normal images. Weight 0 is the prompt map itself and 1 the memory map
    itself, untouched: one source alone needs no common scale."""
    if weight == 0:
        return prompt
    if weight == 1:
        return memory
    z_prompt = (prompt - prompt_stats[0]) / prompt_stats[1]
    z_memory = (memory - memory_stats[0]) / memory_stats[1]
    return (1 - weight) * z_prompt + weight * z_memory
