"""D2D (fixed prompts): the plain text encoding, maps on the listed words, nothing to learn."""

from __future__ import annotations

import pytest
import torch

from d2dprompt.core.runtime.config import ParamsError
from d2dprompt.params import params_from_dict
from d2dprompt.methods.d2d.model import FixedPrompts, word_positions
from d2dprompt.methods.d2dprompt.model import fixed_noise

NORMAL, ABNORMAL = "a photo of a flawless object", "a photo of a damaged object"


def d2d_segmenter(sd, cfg):
    """The model train@d2d records, on the test's tiny SD (the method's build loads its own)."""
    from d2dprompt.methods.d2dprompt.model import D2DSegmenter

    d = cfg.d2d
    prompts = FixedPrompts(sd.tokenizer, d.normal_prompt, d.abnormal_prompt, d.normal_words, d.abnormal_words, cfg.attention.prompts == "joint")
    return D2DSegmenter(sd, prompts, cfg.attention.levels, cfg.model.timestep)


def test_fixed_prompts_are_the_text_encoders_own_encoding(tiny):
    prompts = FixedPrompts(tiny.tokenizer, NORMAL, ABNORMAL, ["flawless", "object"], ["damaged", "object"], joint=False)
    with torch.no_grad():
        ours = prompts(tiny.text_encoder)
        reference = tiny.text_encoder(tiny.tokenizer([NORMAL, ABNORMAL], padding="max_length", return_tensors="pt").input_ids).last_hidden_state
    assert torch.allclose(ours, reference, atol=1e-6)
    assert list(prompts.parameters()) == []


@pytest.mark.parametrize("joint", [False, True])
def test_maps_read_the_listed_words_only(tiny, joint):
    prompts = FixedPrompts(tiny.tokenizer, NORMAL, ABNORMAL, ["flawless"], ["damaged", "object"], joint=joint)
    ids = prompts.layout.input_ids
    seq, positions = prompts.layout.normal_tokens
    assert seq == 0 and tiny.tokenizer.decode(ids[0, positions]).strip() == "flawless"
    seq, positions = prompts.layout.abnormal_tokens
    length = ids.shape[1]
    row = ids[1, positions - length] if joint else ids[seq, positions]
    assert tiny.tokenizer.decode(row).strip() == "damaged object"


def test_a_word_missing_from_its_prompt_is_refused(tiny):
    with pytest.raises(ValueError, match="'shiny'"):
        word_positions(tiny.tokenizer, NORMAL, ["shiny"])
    with pytest.raises(ParamsError, match="d2d.abnormal_words: 'cracked' is not a word of d2d.abnormal_prompt"):
        params_from_dict({"d2d": {"abnormal_words": ["cracked"]}})


def test_d2d_segmenter_has_nothing_to_train_and_maps_in_range(tiny):
    cfg = params_from_dict({"methods": ["d2d"], "attention": {"levels": [0, 1]}})
    seg = d2d_segmenter(tiny, cfg)
    assert seg.state_dict() == {}
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        maps = seg(latents, fixed_noise(2, (4, 16, 16), 0))
    assert maps["anomaly"].shape == (2, 16, 16)
    assert ((maps["anomaly"] >= 0) & (maps["anomaly"] <= 1)).all()
    assert not torch.allclose(maps["anomaly"][0], maps["anomaly"][1])  # the map follows the image
