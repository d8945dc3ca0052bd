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

QUERY_CHUNK = 4096  # query rows per search: one image's cells at 256 px
MEMORY_CHUNK = 16384  # memory rows per distance block (torch path): 4096 x 16384 fp32 = 256 MB, whatever the memory's size
PROJECTION = 128  # PatchCore's random projection for the coreset's distances (its default, sparse in theirs, dense here)
# nearest rows by the product form |q|^2 + |m|^2 - 2 q.m, re-ranked by their direct distance |q - m|: at feature norms
# of ~760 the product form's fp32 rounding (~0.03 in squared distance) picked a non-nearest row for half the queries
# of a near-tie; the direct distance of two fp32 rows is exact to a few ulps of the (small) distance
CANDIDATES = 8


def draw_references(candidates: list[int], k: int, seed: int, category: str) -> list[int]:
    """`k` of a category's normal training images (`candidates`, their row indices), in row order; k 0 = all of them.
    The draw depends on (seed, category) only, so every method given the same fewshot.seed reads the very same images."""
    if k == 0:
        return list(candidates)
    if k > len(candidates):
        raise ValueError(f"fewshot.k={k}: {category} has only {len(candidates)} normal training images")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(category.encode()))
    return [candidates[i] for i in sorted(torch.randperm(len(candidates), generator=generator)[:k].tolist())]


def _closest_dense(queries: torch.Tensor, memory: torch.Tensor, k: int = CANDIDATES) -> torch.Tensor:
    """(N, k) indices of each query's k nearest memory rows from one full distance matrix (the product form)."""
    products = (queries * queries).sum(1, keepdim=True) + (memory * memory).sum(1) - 2 * queries @ memory.T
    return products.topk(min(k, memory.shape[0]), dim=1, largest=False).indices


def closest_blocks(queries: torch.Tensor, memory: torch.Tensor, query_chunk: int, memory_chunk: int, k: int = CANDIDATES) -> torch.Tensor:
    """_closest_dense over blocks of both the queries and the memory, keeping the running k best: any device, memory
    bounded by query_chunk x memory_chunk distances whatever the sizes. (N, k) indices."""
    k = min(k, memory.shape[0])
    memory_sq = (memory * memory).sum(1)
    parts = []
    for start in range(0, queries.shape[0], query_chunk):
        q = queries[start : start + query_chunk]
        q_sq = (q * q).sum(1, keepdim=True)
        best = torch.full((q.shape[0], 0), float("inf"), device=q.device)
        index = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for m_start in range(0, memory.shape[0], memory_chunk):
            block = memory[m_start : m_start + memory_chunk]
            products = q_sq + memory_sq[m_start : m_start + memory_chunk] - 2 * q @ block.T
            value, at = products.topk(min(k, block.shape[0]), dim=1, largest=False)
            best, order = torch.cat([best, value], 1).topk(min(k, best.shape[1] + value.shape[1]), dim=1, largest=False)
            index = torch.cat([index, at + m_start], 1).gather(1, order)
        parts.append(index)
    return torch.cat(parts) if parts else torch.zeros((0, k), dtype=torch.long, device=queries.device)


def _closest_faiss(queries: torch.Tensor, memory: torch.Tensor, query_chunk: int, k: int = CANDIDATES) -> torch.Tensor:
    """faiss's exhaustive L2 search (IndexFlatL2) on the CPU, blocked in both axes inside faiss: about 3x faster than the
    torch blocks at patchknn's sizes (BENCHMARKS.md). (N, k) indices of the k nearest rows by its ranking: its direct
    kernel is exact, but above faiss.cvar.distance_compute_blas_threshold queries it takes the product form too."""
    import faiss

    k = min(k, memory.shape[0])
    index = faiss.IndexFlatL2(memory.shape[1])
    index.add(memory.contiguous().numpy())
    parts = [torch.from_numpy(index.search(queries[s : s + query_chunk].contiguous().numpy(), k)[1])
             for s in range(0, queries.shape[0], query_chunk)]
    return torch.cat(parts) if parts else torch.zeros((0, k), dtype=torch.long)


def nearest_among(queries: torch.Tensor, memory: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D), (N, k) candidate rows -> (N,): the smallest direct distance |q - m| among each query's candidates."""
    return (queries[:, None, :] - memory[candidates]).norm(dim=2).min(1).values


def nearest_distances(queries: torch.Tensor, memory: torch.Tensor, query_chunk: int = QUERY_CHUNK,
                      memory_chunk: int = MEMORY_CHUNK) -> torch.Tensor:
    """(N, D), (M, D) -> (N,): the L2 distance of each query to its nearest memory row, in fp32.

    The CANDIDATES nearest rows are found with faiss on the CPU, or with the matrix-product form in blocks of both axes
    on a GPU (memory bounded whatever N and M), then re-ranked by their direct distance: exact unless more than
    CANDIDATES rows lie within the product form's rounding of the nearest, and a query equal to a memory row gets
    exactly 0 (the product form leaves rounding noise)."""
    queries, memory = queries.float(), memory.float()
    if torch.jit.is_tracing():  # an exported graph repeats a loop as often as it ran when traced: one product for any batch
        candidates = _closest_dense(queries, memory)
    elif queries.device.type == "cpu":
        candidates = _closest_faiss(queries.detach(), memory.detach(), query_chunk)
    else:
        candidates = closest_blocks(queries, memory, query_chunk, memory_chunk)
    return nearest_among(queries, memory, candidates.to(memory.device))


def coreset(features: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """Indices of `rows` of `features` (M, D) chosen by PatchCore's greedy k-center: start at a seeded row, then
    repeatedly add the row farthest from those chosen (distances on a seeded random projection to 128 dims).
    Every row ends within the returned covering radius of a chosen one; `rows` >= M returns all.

    Each step is one matrix-vector product (|x|^2 + |p|^2 - 2 x.p, squared distances), so it reads the M rows once and
    writes M numbers, instead of materialising the M x 128 differences."""
    if rows >= features.shape[0]:
        return torch.arange(features.shape[0])
    generator = torch.Generator().manual_seed(seed)
    flat = features.float()
    if flat.shape[1] > PROJECTION:
        projection = torch.randn(flat.shape[1], PROJECTION, generator=generator) / PROJECTION**0.5
        flat = flat @ projection.to(flat.device)
    squares = (flat * flat).sum(1)
    pick = int(torch.randint(flat.shape[0], (1,), generator=generator))
    chosen = [pick]
    nearest = (squares + squares[pick] - 2 * (flat @ flat[pick])).clamp_(min=0)
    for _ in range(rows - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        torch.minimum(nearest, (squares + squares[pick] - 2 * (flat @ flat[pick])).clamp_(min=0), out=nearest)
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


MUTUAL_BLOCK = 2**26  # numbers per block of mutual scoring (256 MB fp32): images of a block are compared at once


def nearest_per_image(queries: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(HW, D), (G, HW', D) -> (G, HW): each query's nearest distance within each of the G images, from one matrix
    product for all G, its CANDIDATES nearest rows re-ranked by their direct distance (as nearest_distances)."""
    groups, cells, width = images.shape
    flat = images.reshape(-1, width)
    products = (queries * queries).sum(1, keepdim=True) + (flat * flat).sum(1) - 2 * queries @ flat.T
    closest = products.view(len(queries), groups, cells).topk(min(CANDIDATES, cells), dim=2, largest=False).indices  # (HW, G, k)
    neighbours = images[torch.arange(groups, device=images.device)[None, :, None], closest]  # (HW, G, k, D)
    return (queries[:, None, None, :] - neighbours).norm(dim=3).min(2).values.T


def mutual_distances(cells: torch.Tensor, interval: float, block: int = MUTUAL_BLOCK) -> torch.Tensor:
    """MuSc's mutual scoring (Li et al., ICLR 2024) of N images' cells (N, HW, D) -> (N, HW): for a cell of image i,
    its nearest distance to each other image j, sorted over j, and the mean of the smallest `interval` share of them
    (at least one). A defect rarely repeats at the same place in the other images, so its distances stay large, while
    a normal cell finds a close match in most of them; averaging the smallest share, not taking the minimum, keeps one
    other image with the same defect from hiding it.

    On the CPU one faiss search per image; elsewhere each image is compared with as many others at once as fit
    `block` numbers (mutual_blocks)."""
    n = cells.shape[0]
    if n < 2:
        raise ValueError("mutual scoring needs at least 2 images of a category scored together")
    keep = max(1, int(interval * (n - 1)))  # MuSc's interval [0, 0.3) of the N - 1 sorted distances, floored
    cells = cells.float()
    return _mutual_faiss(cells, keep) if cells.device.type == "cpu" else mutual_blocks(cells, keep, block)


def mutual_blocks(cells: torch.Tensor, keep: int, block: int = MUTUAL_BLOCK) -> torch.Tensor:
    """mutual_distances on any device (a GPU's path): each image against as many others at once as fit `block`."""
    n, hw, width = cells.shape
    group = max(1, block // (hw * max(hw, width * CANDIDATES)))  # the products, or the candidates' rows
    out = torch.empty(cells.shape[:2], device=cells.device)
    for i in range(n):
        others = torch.cat([cells[:i], cells[i + 1 :]])
        distances = torch.cat([nearest_per_image(cells[i], others[g : g + group]) for g in range(0, n - 1, group)])  # (N - 1, HW)
        out[i] = distances.sort(dim=0).values[:keep].mean(0)
    return out


def _mutual_faiss(cells: torch.Tensor, keep: int) -> torch.Tensor:
    """mutual_distances on the CPU: one exact faiss search per image j, of every other image's cells against j's
    (about 5x the torch products' speed, BENCHMARKS.md); holds the (N, N, HW) distances of one category."""
    n, hw, width = cells.shape
    distances = torch.full((n, n, hw), float("inf"))  # [i, j]: image i's cells to their nearest in image j
    flat = cells.reshape(-1, width)
    for j in range(n):
        others = torch.cat([flat[: j * hw], flat[(j + 1) * hw :]])
        found = nearest_among(others, cells[j], _closest_faiss(others, cells[j], QUERY_CHUNK)).view(n - 1, hw)
        distances[torch.arange(n) != j, j] = found
    return distances.sort(dim=1).values[:, :keep].mean(1)


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
