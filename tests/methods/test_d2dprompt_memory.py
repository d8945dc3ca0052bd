"""Few-shot D2D-Prompt (methods/d2dprompt/memory.py) on the tiny SD: the memory is the UNet's own features, a
reference image's memory map is 0, and the fusion weights 0 and 1 give the prompt map and the memory map."""

from __future__ import annotations

import pytest
import torch

from d2dprompt.core.runtime.config import AttentionParams, ModelParams, PromptParams
from d2dprompt.methods.d2dprompt.memory import category_maps, maps_and_features, split_weights
from d2dprompt.methods.d2dprompt.model import build_segmenter, fixed_noise
from d2dprompt.methods.patch_memory import distance_map


@pytest.fixture(scope="module")
def segmenter(tiny):
    torch.manual_seed(0)
    return build_segmenter(tiny, PromptParams(), AttentionParams(levels=[0, 1]), ModelParams(timestep=100)).eval()


def test_one_pass_gives_the_prompt_map_and_the_features_of_every_captured_layer(segmenter):
    latents = torch.randn(3, 4, 16, 16)
    noise = fixed_noise(3, (4, 16, 16), 0)
    prompt_map, features = maps_and_features(segmenter, latents, noise)
    torch.testing.assert_close(prompt_map, segmenter(latents, noise)["anomaly"].float())  # the very map evaluate scores
    assert set(features) == set(segmenter.captured)
    for name, level in segmenter.captured.items():
        attn = segmenter.cross_attention[name]
        assert features[name].shape == (3, (16 >> level) ** 2, attn.to_q.out_features)  # all heads of the query, per cell


@pytest.mark.parametrize("weight", [0.0, 1.0, 0.3])
def test_fusion_weights_and_a_reference_image_that_is_its_own_memory(segmenter, weight):
    references, others = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    noise = fixed_noise(2, (4, 16, 16), 0)
    prompt_map, features = maps_and_features(segmenter, references, noise)
    memory = {"s/c": {name: f.flatten(0, 1) for name, f in features.items()}}
    stats = {"s/c": {"prompt_stats": [0.5, 0.1], "memory_stats": [2.0, 4.0]}}
    fused = category_maps(segmenter, memory, stats, weight, references, noise, ["s/c", "s/c"])
    if weight == 0:
        assert torch.equal(fused, prompt_map)
    elif weight == 1:
        assert torch.equal(fused, torch.zeros_like(fused))  # every cell of a reference image is in the memory
    else:
        torch.testing.assert_close(fused, 0.7 * (prompt_map - 0.5) / 0.1 + 0.3 * (0 - 2.0) / 4.0)
    other_map, other_features = maps_and_features(segmenter, others, noise)
    alone = category_maps(segmenter, memory, stats, 1.0, others, noise, ["s/c", "s/c"])
    torch.testing.assert_close(alone, distance_map(other_features, memory["s/c"], segmenter.captured, (16, 16)))
    assert (alone > 0).all()


def test_rows_of_a_batch_read_their_own_category_memory(segmenter):
    a, b = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    noise = fixed_noise(2, (4, 16, 16), 0)
    _, features = maps_and_features(segmenter, torch.cat([a, b]), noise)
    memory = {"s/a": {n: f[0] for n, f in features.items()}, "s/b": {n: f[1] for n, f in features.items()}}
    stats = {c: {"prompt_stats": [0.0, 1.0], "memory_stats": [0.0, 1.0]} for c in memory}
    fused = category_maps(segmenter, memory, stats, 1.0, torch.cat([a, b]), noise, ["s/a", "s/b"])
    assert torch.equal(fused, torch.zeros_like(fused))
    crossed = category_maps(segmenter, memory, stats, 1.0, torch.cat([a, b]), noise, ["s/b", "s/a"])
    assert (crossed > 0).all()


def test_the_weights_file_splits_into_prompts_and_per_category_memories():
    weights = {"ctx": torch.zeros(2), "memory/sample/disc/down_blocks.0.attn2.processor": torch.ones(3, 2), "memory/sample/tile/up.attn2.processor": torch.ones(1, 2)}
    prompts, memory = split_weights(weights)
    assert list(prompts) == ["ctx"]
    assert {c: list(m) for c, m in memory.items()} == {"sample/disc": ["down_blocks.0.attn2.processor"], "sample/tile": ["up.attn2.processor"]}


def test_a_fixed_threshold_is_refused_for_memory_maps_but_not_for_the_prompt_map_alone():
    from d2dprompt.core.runtime.config import ParamsError
    from d2dprompt.params import params_from_dict

    with pytest.raises(ParamsError, match=r"^evaluate\.threshold: fewshot\.k=4 reads memory maps \(feature distances, not in \[0, 1\]\)"):
        params_from_dict({"fewshot": {"k": 4}, "evaluate": {"threshold": "fixed"}})
    params_from_dict({"fewshot": {"k": 4, "fusion": 0.0}, "evaluate": {"threshold": "fixed"}})
    params_from_dict({"evaluate": {"threshold": "fixed"}})  # k 0: today's maps in [0, 1]


def test_the_fusion_statistics_read_real_normal_validation_rows_only(segmenter, tmp_path, monkeypatch):
    """The fusion's normalisation is fitted on the real normal validation images, by the rule that picks the normal
    training rows: a synthetic row of the validation split is never one of them, whatever label it carries."""
    from safetensors.torch import save_file

    from d2dprompt.core.data.latent_store import LatentRow, write_index
    from d2dprompt.methods.d2dprompt import memory
    from d2dprompt.params import params_from_dict

    def row(key: str, source: str, split: str) -> LatentRow:
        return LatentRow(key, source, "disc", split, 0, "good", f"disc/train/good/{key}.png", "")

    rows = [row("a", "real", "train"), row("b", "real", "val"), row("c", "real", "val"), row("b#syn0", "synthetic", "val")]
    folder = tmp_path / "sample"
    folder.mkdir()
    write_index(rows, folder / "index.csv")
    latents = torch.randn(len(rows), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    save_file({"latents": latents.half()}, str(folder / "latents.safetensors"))
    seen = []
    monkeypatch.setattr(memory, "validation_statistics", lambda seg, mem, val, *rest: seen.append(val) or {})
    cfg = params_from_dict({"fewshot": {"mutual": True, "fusion": 0.5}, "evaluate": {"datasets": ["sample"]}})
    memory.build_memory(segmenter, cfg, tmp_path, torch.device("cpu"), lambda line: None)
    assert len(seen) == 1 and torch.equal(seen[0], latents.half()[1:3])
