"""The few-shot memory's core (methods/patch_memory.py) against brute force and by its definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2dprompt.methods.patch_memory import (CANDIDATES, closest_blocks, nearest_among, coreset, distance_map, draw_references, fuse, map_statistics,
                                            mutual_blocks, mutual_distances, nearest_distances)


def brute_force(queries: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """Every pairwise distance in float64, the smallest per query."""
    return np.sqrt(((queries[:, None, :].astype(np.float64) - memory[None].astype(np.float64)) ** 2).sum(-1)).min(1)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_nearest_distances_match_a_brute_force_numpy_reference(chunk):
    rng = np.random.default_rng(0)
    queries, memory = rng.normal(size=(300, 36)).astype(np.float32), rng.normal(size=(500, 36)).astype(np.float32)
    got = nearest_distances(torch.from_numpy(queries), torch.from_numpy(memory), query_chunk=chunk).numpy()
    np.testing.assert_allclose(got, brute_force(queries, memory), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query_chunk,memory_chunk", [(7, 11), (64, 500), (4096, 16384)])
def test_the_blocked_search_of_a_gpu_finds_the_brute_force_neighbours_in_blocks_of_both_axes(query_chunk, memory_chunk):
    rng = np.random.default_rng(2)
    queries, memory = rng.normal(size=(300, 36)).astype(np.float32), rng.normal(size=(500, 36)).astype(np.float32)
    exact = ((queries[:, None, :].astype(np.float64) - memory[None].astype(np.float64)) ** 2).sum(-1).argsort(1)[:, :CANDIDATES]
    found = closest_blocks(torch.from_numpy(queries), torch.from_numpy(memory), query_chunk, memory_chunk).numpy()
    assert (found == exact).all()  # the CANDIDATES nearest, nearest first
    distances = nearest_among(torch.from_numpy(queries), torch.from_numpy(memory), torch.from_numpy(found)).numpy()
    np.testing.assert_allclose(distances, brute_force(queries, memory), rtol=1e-6)


def near_ties(n: int = 300, d: int = 36) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries of norm ~760 (latents x 3 x 3 at real size), each with two memory rows 0.06 away and within 2 % of
    each other: the product form's fp32 rounding (~0.03 in squared distance) cannot tell them apart."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=g) * 127
    memory = torch.stack([row + scale * torch.randn(d, generator=g) for row in base for scale in (0.010, 0.0102)])
    return base, memory


@pytest.mark.parametrize("path", ["faiss", "faiss's product form", "gpu blocks"])
def test_a_near_tie_gets_the_nearest_distance_not_the_product_forms_pick(path, monkeypatch):
    """The product form alone picked the farther row for about half of these queries (excess up to 3e-2); faiss's
    exhaustive search takes it too above its BLAS threshold of queries (mutual scoring of a category reaches it)."""
    import faiss

    queries, memory = near_ties()
    exact = torch.cdist(queries.double(), memory.double()).min(1).values
    if path == "faiss's product form":
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1)
    if path == "gpu blocks":
        got = nearest_among(queries, memory, closest_blocks(queries, memory, 64, 100))
    else:
        got = nearest_distances(queries, memory)
    assert float((got.double() - exact).abs().max()) < 1e-6


def test_mutual_scoring_in_blocks_equals_the_pairwise_brute_force():
    rng = np.random.default_rng(3)
    cells = rng.normal(size=(7, 20, 12)).astype(np.float32)
    keep = max(1, int(0.3 * 6))
    expected = np.stack([np.sort(np.stack([brute_force(cells[i], cells[j]) for j in range(7) if j != i]), 0)[:keep].mean(0)
                         for i in range(7)])
    np.testing.assert_allclose(mutual_distances(torch.from_numpy(cells), 0.3).numpy(), expected, rtol=1e-5, atol=1e-5)  # faiss
    for block in (1, 20 * 20 * 3, 2**26):  # the GPU's path: one image per product, three, all six
        got = mutual_blocks(torch.from_numpy(cells), keep, block=block).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def greedy_reference(features: np.ndarray, rows: int, seed: int) -> list[int]:
    """PatchCore's greedy k-center in float64 with direct distances, drawing the projection and start as coreset does."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.from_numpy(features).float()
    if flat.shape[1] > 128:
        flat = flat @ (torch.randn(flat.shape[1], 128, generator=generator) / 128**0.5)
    flat = flat.double().numpy()
    chosen = [int(torch.randint(flat.shape[0], (1,), generator=generator))]
    nearest = np.linalg.norm(flat - flat[chosen[0]], axis=1)
    for _ in range(rows - 1):
        chosen.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, np.linalg.norm(flat - flat[chosen[-1]], axis=1))
    return sorted(chosen)


@pytest.mark.parametrize("width", [36, 300])  # 300 > 128: the random projection first
def test_the_coreset_picks_the_rows_of_a_float64_brute_force_greedy(width):
    features = np.random.default_rng(4).normal(size=(3000, width)).astype(np.float32)
    assert coreset(torch.from_numpy(features), 60, seed=5).tolist() == greedy_reference(features, 60, 5)


def test_a_feature_that_is_in_the_memory_is_exactly_zero_away():
    rng = np.random.default_rng(1)
    memory = torch.from_numpy(rng.normal(100, 50, size=(400, 320)).astype(np.float32))  # large norms: |q|^2 + |m|^2 - 2qm rounds
    queries = torch.cat([memory[::7], memory[::7] + 1.0])
    got = nearest_distances(queries, memory)
    assert torch.equal(got[: len(memory[::7])], torch.zeros(len(memory[::7])))
    assert (got[len(memory[::7]) :] > 0).all()


def test_the_distance_map_of_an_image_in_the_memory_is_zero_and_levels_average_like_the_attention_maps():
    torch.manual_seed(0)
    features = {"fine": torch.randn(2, 16, 5), "coarse": torch.randn(2, 4, 3)}  # 4x4 cells at level 0, 2x2 at level 1
    levels = {"fine": 0, "coarse": 1}
    memory = {name: f[0] for name, f in features.items()}  # image 0 is the reference
    maps = distance_map(features, memory, levels, (4, 4))
    assert maps.shape == (2, 4, 4) and torch.equal(maps[0], torch.zeros(4, 4)) and (maps[1] > 0).all()
    fine = torch.from_numpy(brute_force(features["fine"][1].numpy(), memory["fine"].numpy())).float().view(4, 4)
    coarse = torch.from_numpy(brute_force(features["coarse"][1].numpy(), memory["coarse"].numpy())).float().view(1, 1, 2, 2)
    coarse = torch.nn.functional.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(maps[1], (fine + coarse) / 2, rtol=1e-5, atol=1e-5)


def test_fusion_is_the_prompt_map_at_weight_0_the_memory_map_at_1_and_normalised_between():
    prompt, memory = torch.rand(3, 8, 8), 40 * torch.rand(3, 8, 8) + 7
    p_stats, m_stats = map_statistics(prompt[:1]), map_statistics(memory[:1])
    assert torch.equal(fuse(prompt, memory, 0.0, p_stats, m_stats), prompt)
    assert torch.equal(fuse(prompt, memory, 1.0, p_stats, m_stats), memory)
    half = fuse(prompt, memory, 0.5, p_stats, m_stats)
    expected = 0.5 * (prompt - p_stats[0]) / p_stats[1] + 0.5 * (memory - m_stats[0]) / m_stats[1]
    torch.testing.assert_close(half, expected)
    assert abs(map_statistics(memory[:1])[0] - float(memory[:1].double().mean())) < 1e-9


def test_reference_draws_are_seeded_per_category_and_k_0_takes_all():
    twenty = list(range(20))
    first = draw_references(twenty, 4, 0, "sample/disc")
    assert first == draw_references(twenty, 4, 0, "sample/disc") and len(set(first)) == 4 and first == sorted(first)
    assert len({tuple(draw_references(twenty, 4, seed, "sample/disc")) for seed in range(3)}) == 3  # three draws, three sets
    assert first != draw_references(twenty, 4, 0, "sample/tile")
    assert draw_references([100 + i for i in twenty], 4, 0, "sample/disc") == [100 + i for i in first]  # the same draw of other rows
    assert draw_references(list(range(5)), 0, 0, "x/y") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fewshot.k=6: x/y has only 5 normal training images"):
        draw_references(list(range(5)), 6, 0, "x/y")


def test_the_coreset_is_the_greedy_k_center_and_covers_better_than_a_random_subset():
    rng = np.random.default_rng(2)
    points = torch.from_numpy(np.concatenate([rng.normal(c, 0.1, size=(100, 2)) for c in (0, 5, 10, 15)]).astype(np.float32))
    picked = coreset(points, 4, seed=0)
    assert len(picked) == 4 and sorted({int(i) // 100 for i in picked}) == [0, 1, 2, 3]  # one point in each cluster
    radius = nearest_distances(points, points[picked]).max()
    random_radius = nearest_distances(points, points[torch.randperm(400, generator=torch.Generator().manual_seed(0))[:4]]).max()
    assert radius < 1.0 < random_radius
    assert torch.equal(coreset(points, 400, seed=0), torch.arange(400))
    # the greedy step by hand: each pick is the point farthest from those already chosen
    start = int(torch.randint(400, (1,), generator=torch.Generator().manual_seed(0)))
    far = int(torch.cdist(points, points[[start]]).argmax())
    assert {start, far} <= set(picked.tolist())


def test_mutual_scoring_is_musc_interval_average_against_a_brute_force_reference():
    from d2dprompt.methods.patch_memory import mutual_distances

    rng = np.random.default_rng(3)
    cells = rng.normal(size=(11, 9, 6)).astype(np.float32)
    got = mutual_distances(torch.from_numpy(cells), 0.3).numpy()
    for i in range(11):
        per_image = np.stack([brute_force(cells[i], cells[j]) for j in range(11) if j != i])  # (10, 9)
        expected = np.sort(per_image, axis=0)[:3].mean(0)  # int(0.3 x 10) = 3 smallest, as MuSc's topmin_max
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)


def test_a_defect_that_no_other_image_shares_scores_high_and_one_image_alone_is_refused():
    from d2dprompt.methods.patch_memory import mutual_distances

    normal = torch.zeros(6, 16, 3) + torch.linspace(0, 1, 16)[None, :, None]  # six identical normal images
    normal[2, 5] += 4.0  # a defect in one cell of image 2
    scores = mutual_distances(normal, 0.3)
    assert scores[2, 5] > 3.9 and scores[2].argmax() == 5
    assert torch.equal(scores[[0, 1, 3, 4, 5]], torch.zeros(5, 16))  # the others all find their twin
    with pytest.raises(ValueError, match="at least 2 images"):
        mutual_distances(normal[:1], 0.3)
