import pytest
import torch

from d2dprompt.core.runtime.config import AttentionParams, ModelParams, PromptParams
from d2dprompt.core.models import build_tiny
from d2dprompt.methods.d2dprompt.model import build_segmenter, fixed_noise


@pytest.fixture(scope="module")
def sd():
    return build_tiny(0)


@pytest.mark.parametrize("prompts", ["paired", "joint"])
def test_gradients_reach_every_prompt_parameter_and_no_frozen_one(sd, prompts):
    torch.manual_seed(0)
    seg = build_segmenter(sd, PromptParams(), AttentionParams(levels=[0, 1], prompts=prompts), ModelParams(timestep=100))
    latents = torch.randn(2, 4, 16, 16)
    maps = seg(latents, fixed_noise(2, (4, 16, 16), 0))
    assert maps["anomaly"].shape == (2, 16, 16)
    assert ((maps["anomaly"] >= 0) & (maps["anomaly"] <= 1)).all()
    (maps["anomaly"] * torch.linspace(0, 1, 16)).sum().backward()
    for name, p in seg.prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for module in (sd.text_encoder, sd.unet, sd.vae):
        assert all(p.grad is None for p in module.parameters())
    assert set(seg.state_dict()) == {f"prompts.{n}" for n, _ in seg.prompts.named_parameters()}


def test_maps_are_deterministic_for_fixed_noise(sd):
    torch.manual_seed(0)
    seg = build_segmenter(sd, PromptParams(), AttentionParams(levels=[1]), ModelParams())
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        a = seg(latents, fixed_noise(2, (4, 16, 16), 3))["anomaly"]
        b = seg(latents, fixed_noise(2, (4, 16, 16), 3))["anomaly"]
    assert torch.equal(a, b)


def test_fixed_noise_depends_on_the_seed_only():
    a = fixed_noise(2, (4, 8, 8), 0)
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], fixed_noise(1, (4, 8, 8), 0)[0])
    assert not torch.equal(a[0], fixed_noise(1, (4, 8, 8), 1)[0])


def test_bad_timestep_is_named(sd):  # the scheduler's step count is known once the model loads
    with pytest.raises(ValueError, match="model.timestep=1000"):
        build_segmenter(sd, PromptParams(), AttentionParams(), ModelParams(timestep=1000))


@pytest.mark.parametrize("prompts", ["paired", "joint"])
def test_cached_maps_equal_full_maps_for_the_reference_prompt(sd, prompts):
    torch.manual_seed(0)
    seg = build_segmenter(sd, PromptParams(), AttentionParams(levels=[0, 1, 2], prompts=prompts), ModelParams())
    latents = torch.randn(3, 4, 16, 16)
    noise = fixed_noise(3, (4, 16, 16), 0)
    queries = seg.compute_queries(latents, noise)
    assert all(q.shape[:2] == (seg.passes, 3) for q in queries.values())
    with torch.no_grad():
        full = seg(latents, noise)
        cached = seg.forward_cached(queries, (16, 16))
    for key in ("anomaly", "normal_mass", "abnormal_mass"):
        assert torch.allclose(full[key], cached[key], atol=1e-6), key
    # once the prompts move, cached maps only approximate the full ones
    with torch.no_grad():
        for p in seg.prompts.parameters():
            p.add_(0.5 * torch.randn_like(p))
        moved_full = seg(latents, noise)["anomaly"]
        moved_cached = seg.forward_cached(queries, (16, 16))["anomaly"]
    assert not torch.allclose(moved_full, moved_cached, atol=1e-6)


@pytest.mark.parametrize("prompts", ["paired", "joint"])
def test_cached_mode_gradients_reach_every_prompt_parameter(sd, prompts):
    torch.manual_seed(0)
    seg = build_segmenter(sd, PromptParams(), AttentionParams(levels=[0, 1], prompts=prompts), ModelParams())
    latents = torch.randn(2, 4, 16, 16)
    queries = seg.compute_queries(latents, fixed_noise(2, (4, 16, 16), 0))
    maps = seg.forward_cached(queries, (16, 16))
    (maps["anomaly"] * torch.linspace(0, 1, 16)).sum().backward()
    for name, p in seg.prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for module in (sd.text_encoder, sd.unet, sd.vae):
        assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_queries_written_batch_by_batch_read_as_the_ones_held_in_memory(sd, tmp_path, dtype):
    """The queries stage writes one batch at a time into the safetensors file (its memory no longer holds every
    row): the file has save_file's bytes for the in-memory result, over batches that do not divide the rows, and a
    row is one contiguous slice, in both stored forms."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from d2dprompt.methods.d2dprompt.query_cache import compute_queries, write_queries

    torch.manual_seed(0)
    segmenter = build_segmenter(sd, PromptParams(), AttentionParams(levels=[0, 1]), ModelParams(timestep=100)).eval()
    latents, noise = torch.randn(5, 4, 16, 16), fixed_noise(5, (4, 16, 16), 0)
    shapes = write_queries(segmenter, latents, noise, 2, torch.device("cpu"), tmp_path / "queries.safetensors", dtype=dtype)
    held = compute_queries(segmenter, latents, noise, 2, torch.device("cpu"), dtype=dtype)
    save_file(held, tmp_path / "whole.safetensors")
    assert (tmp_path / "queries.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert set(shapes) == set(held) and all(shapes[n][0] == tuple(held[n].shape) for n in held)
    assert len(held) == (2 if dtype == "int8" else 1) * len(segmenter.captured)
    with safe_open(str(tmp_path / "queries.safetensors"), framework="pt") as fh:  # one row is one contiguous slice
        name = sorted(held)[-1]
        assert torch.equal(fh.get_slice(name)[3:4][0], held[name][3])


def test_int8_queries_read_back_within_half_a_step_of_each_channel_and_keep_its_cells_apart(sd, tmp_path):
    """int8 queries dequantise to within half a quantisation step of the float32 queries, per channel (a channel
    with small values keeps its own fine step instead of the layer's largest); the cache hands them over as float32
    (passes, B, heads, HW, d) whether resident or streamed."""
    from d2dprompt.methods.d2dprompt.query_cache import INT8_MAX, SCALE, QueryCache, compute_queries, quantised, save_queries

    q = torch.randn(3, 1, 2, 64, 8) * torch.logspace(-3, 2, 8)  # channels six orders of magnitude apart
    stored = quantised(q)
    back = stored[""].float() * stored[SCALE].float()
    step = q.abs().amax(dim=-2, keepdim=True) / INT8_MAX
    assert stored[""].dtype == torch.int8 and stored[SCALE].shape == (3, 1, 2, 1, 8)
    assert (stored[SCALE].float() >= step).all() and (stored[SCALE].float() <= step * 1.004 + 2.0**-24).all()  # rounded up, finely
    assert ((back - q).abs() <= 0.5 * stored[SCALE].float() * (1 + 1e-6)).all()
    assert torch.equal(quantised(torch.zeros(1, 1, 1, 4, 2))[""], torch.zeros(1, 1, 1, 4, 2, dtype=torch.int8))  # no 0/0

    torch.manual_seed(0)
    segmenter = build_segmenter(sd, PromptParams(), AttentionParams(levels=[0, 1]), ModelParams(timestep=100)).eval()
    latents, noise = torch.randn(4, 4, 16, 16), fixed_noise(4, (4, 16, 16), 0)
    exact = compute_queries(segmenter, latents, noise, 4, torch.device("cpu"), dtype="float16")
    save_queries(compute_queries(segmenter, latents, noise, 4, torch.device("cpu"), dtype="int8"), ["a", "b", "c", "d"], tmp_path)
    streamed = QueryCache(path=tmp_path / "queries.safetensors")
    rows = torch.tensor([2, 0])
    for cache in (streamed, streamed.resident(torch.device("cpu"))):
        got = cache.batch(rows, torch.device("cpu"))
        assert set(got) == set(exact)
        for name, value in got.items():
            want = exact[name][rows].float().transpose(0, 1)
            assert value.dtype == torch.float32 and value.shape == want.shape
            assert (value - want).abs().max() <= want.abs().max() / INT8_MAX
    assert streamed.nbytes < 0.6 * sum(t.numel() * 2 for t in exact.values())
