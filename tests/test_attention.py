import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from d2dprompt.methods.d2dprompt.attention import aggregate_maps, attention_probs, cross_attention_levels, install_capture
from d2dprompt.core.models import build_tiny


@pytest.fixture()
def fresh():
    return build_tiny(0)  # processors get swapped: keep the session model untouched


def test_levels_follow_the_block_structure(tiny):
    levels = cross_attention_levels(tiny.unet)
    assert levels["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 0
    assert levels["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 1
    assert levels["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] == 2
    assert levels["up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor"] == 0
    names = list(levels)
    assert names.index("mid_block.attentions.0.transformer_blocks.0.attn2.processor") < names.index(
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    )


def test_capture_changes_nothing_in_the_unet_output(fresh):
    unet = fresh.unet
    z, t, states = torch.randn(2, 4, 16, 16), torch.tensor([50, 50]), torch.randn(2, 77, 64)
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        reference = unet(z, t, states).sample
        recorder, captured = install_capture(unet, [0, 1, 2], early_exit=False)
        captured_out = unet(z, t, states).sample
    assert torch.allclose(reference, captured_out, atol=1e-5)
    assert set(recorder.probs) == set(captured)
    for name, level in captured.items():
        probs = recorder.probs[name]
        assert probs.shape == (2, (16 >> level) ** 2, 77)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_only_captured_layers_get_the_capture_processor(fresh):
    _, captured = install_capture(fresh.unet, [1])
    kinds = {name: type(proc).__name__ for name, proc in fresh.unet.attn_processors.items()}
    assert {n for n, k in kinds.items() if k == "CaptureProcessor"} == set(captured)
    assert all(level == 1 for level in captured.values())


def test_unknown_level_is_refused(fresh):
    with pytest.raises(ValueError, match=r"attention.levels: \[5\]"):
        install_capture(fresh.unet, [0, 5])


def test_aggregate_maps_is_the_abnormal_share():
    hw = 4 * 4
    probs = torch.zeros(2, hw, 10)  # paired: image 0 with the normal prompt, then with the abnormal one
    probs[0, :, 1] = 0.2  # normal token mass
    probs[1, :, 2] = 0.6  # abnormal token mass
    maps = aggregate_maps({"a": probs}, {"a": 0}, (4, 4), (0, torch.tensor([1])), (1, torch.tensor([2])), paired=True)
    assert torch.allclose(maps["anomaly"], torch.full((1, 4, 4), 0.75), atol=1e-4)
    assert torch.allclose(maps["abnormal_mass"], torch.full((1, 4, 4), 0.6))
    assert maps["anomaly_levels"].shape == (1, 1, 4, 4)


def test_attention_probs_stay_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 64, 32, generator=gen), torch.randn(1, 4, 77, 32, generator=gen)
    reference = attention_probs(query, key, 32**-0.5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = attention_probs(query, key, 32**-0.5)
    assert mixed.dtype == torch.float32
    assert (mixed - reference).abs().max() < 1e-5
