import pytest
import torch

from d2dprompt.core.models import build_tiny, bundled_clip_tokenizer, load_frozen, save_tiny


def test_bundled_tokenizer_matches_clip_ids():
    tok = bundled_clip_tokenizer()
    assert len(tok) == 49408
    # ids of OpenAI CLIP's tokenizer for this sentence
    assert tok("a photo of a damaged object.").input_ids == [49406, 320, 1125, 539, 320, 13568, 14115, 269, 49407]


def test_tiny_is_a_function_of_its_seed(tiny):
    again = build_tiny(0)
    other = build_tiny(1)
    w = tiny.unet.conv_in.weight
    assert torch.equal(w, again.unet.conv_in.weight)
    assert not torch.equal(w, other.unet.conv_in.weight)


def test_tiny_is_frozen(tiny):
    for module in (tiny.text_encoder, tiny.unet, tiny.vae):
        assert not any(p.requires_grad for p in module.parameters())


def test_saved_diffusers_folder_loads_through_from_pretrained(tmp_path):
    tiny = build_tiny(0)  # a fresh copy: other tests install capture processors on the shared one
    folder = save_tiny(tmp_path / "sd", seed=0)
    for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (folder / sub).is_dir()
    loaded = load_frozen(str(folder))
    ids = loaded.tokenizer("a damaged object.", padding="max_length", return_tensors="pt").input_ids
    assert torch.equal(ids, tiny.tokenizer("a damaged object.", padding="max_length", return_tensors="pt").input_ids)
    with torch.no_grad():
        states = loaded.text_encoder(ids).last_hidden_state
        assert torch.allclose(states, tiny.text_encoder(ids).last_hidden_state)
        z = torch.randn(1, 4, 8, 8)
        t = torch.tensor([10])
        assert torch.allclose(loaded.unet(z, t, states).sample, tiny.unet(z, t, states).sample, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.vae_scale == tiny.vae_scale == 4


def test_a_folder_without_unet_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        load_frozen(str(tmp_path))


def test_hub_style_tokenizer_folder_loads_like_stable_diffusion_2(tmp_path):
    """SD checkpoints ship vocab.json + merges.txt (no tokenizer.json); SD 2 pads with '!' (id 0)."""
    import json

    from transformers import CLIPTokenizer

    from d2dprompt.core.models import _clip_vocab_and_merges
    from d2dprompt.methods.prompt_learner import build_layout

    vocab, merges = _clip_vocab_and_merges()
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {"model_max_length": 77, "pad_token": "!", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<|endoftext|>"}))
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer")
    assert tok("a photo of a damaged object.").input_ids == bundled_clip_tokenizer()("a photo of a damaged object.").input_ids
    ids = build_layout(tok, 12, "object", "damaged", joint=False).input_ids
    end = int((ids[1] == tok.eos_token_id).nonzero()[0])
    assert ids[1, end + 1 :].eq(0).all()  # padding with '!' as SD 2 does, not with the end token


@pytest.mark.parametrize("prompts", ["joint", "paired"])
def test_an_fp16_checkpoint_loads_in_fp32_and_runs_both_modes(tmp_path, prompts):
    from d2dprompt.params import params_from_dict
    from d2dprompt.methods.d2dprompt.model import build_segmenter

    loaded = load_frozen(str(save_tiny(tmp_path / "sd16", seed=0, dtype=torch.float16)))
    for module in (loaded.text_encoder, loaded.unet, loaded.vae):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    cfg = params_from_dict({"attention": {"prompts": prompts, "levels": [0, 1]}})
    torch.manual_seed(0)
    segmenter = build_segmenter(loaded, cfg.prompt, cfg.attention, cfg.model)
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    full = segmenter(latents, noise)["anomaly"]
    cached = segmenter.forward_cached(segmenter.compute_queries(latents, noise), (16, 16))["anomaly"]
    assert torch.allclose(full, cached, atol=1e-6)
    full.sum().backward()  # gradients reach the prompts through fp32 weights
    assert all(p.grad is not None for p in segmenter.prompts.parameters())
