"""AnomalyCLIP's pure model on the tiny CLIP: text side, DPAM, maps, loss, loading."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from d2dprompt.methods.anomalyclip.model import (
    CLIP_MEAN,
    CLIP_STD,
    TINY,
    AnomalyCLIP,
    anomaly_map,
    anomalyclip_loss,
    build_tiny_clip,
    dpam_block,
    encode_image,
    image_score,
    load_clip,
    normalize,
    position_embeddings,
    vv_attention,
)

SIZE = 112  # 8 x 8 patches of 14 px


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    return load_clip(TINY, 0, SIZE)


def make_model(clip_and_tokenizer, **kwargs) -> AnomalyCLIP:
    clip, tokenizer = clip_and_tokenizer
    args = dict(n_ctx=4, t_n_ctx=2, depth=3, dpam_layers=19, feature_layers=[24])
    args.update(kwargs)
    torch.manual_seed(0)
    return AnomalyCLIP(clip, tokenizer, **args)


def images(batch: int = 2, height: int = SIZE, width: int = SIZE, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return normalize(torch.rand(batch, 3, height, width, generator=gen))


# ------------------------------------------------------------------------------------------ text side


def test_text_features_are_the_prompt_learners_states_pooled_at_eot_and_projected(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    model = make_model(clip_and_tokenizer)
    with torch.no_grad():
        for p in model.prompts.parameters():  # away from the init so every learned vector matters
            p.add_(torch.randn_like(p))
        states = model.prompts.encode_prompts(clip.text_model)  # (2, L, D), final-layer-normed
        ids = tokenizer(
            ["X X X X object.", "X X X X damaged object."], padding="max_length", return_tensors="pt"
        ).input_ids
        eot = ids.argmax(-1)  # as the authors: EOT has the highest id, the first one wins
        by_hand = states[torch.arange(2), eot] @ clip.text_projection.weight.T
        by_hand = by_hand / by_hand.norm(dim=-1, keepdim=True)
        assert torch.equal(ids, model.prompts.input_ids)
        assert torch.allclose(model.text_features(), by_hand, atol=1e-6)


def test_with_word_embeddings_as_context_and_no_deep_prompts_text_features_are_clips(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    model = make_model(clip_and_tokenizer, depth=1)
    (x_id,) = tokenizer("X", add_special_tokens=False).input_ids
    with torch.no_grad():
        x_embedding = clip.text_model.embeddings.token_embedding.weight[x_id]
        model.prompts.ctx_normal.copy_(x_embedding.expand_as(model.prompts.ctx_normal))
        model.prompts.ctx_abnormal.copy_(x_embedding.expand_as(model.prompts.ctx_abnormal))
        ids = tokenizer(
            ["X X X X object.", "X X X X damaged object."], padding="max_length", return_tensors="pt"
        ).input_ids
        reference = clip.get_text_features(input_ids=ids).pooler_output
        reference = reference / reference.norm(dim=-1, keepdim=True)
        assert torch.allclose(model.text_features(), reference, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DPAM


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _linear(x, lin):
    return x @ lin.weight.T + lin.bias


def _heads_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d_head)) v, one head at a time, concatenated."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
        outs.append(weights @ v[:, sl])
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("heads", [1, 2])
def test_dpam_block_is_vv_attention_beside_the_unchanged_block(heads):
    torch.manual_seed(3)
    config = CLIPVisionConfig(hidden_size=4, intermediate_size=8, num_attention_heads=heads, hidden_act="quick_gelu")
    layer = CLIPEncoderLayer(config).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.7)  # hand-set, non-trivial LN affine and biases too
    parallel, original = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    with torch.no_grad():
        new_parallel, new_original = dpam_block(layer, parallel, original)
        attn = layer.self_attn
        n = _layer_norm(original[0], layer.layer_norm1)
        v = _linear(n, attn.v_proj)
        vv = _linear(_heads_attention(v, v, v, heads), attn.out_proj)
        assert torch.allclose(new_parallel[0], parallel[0] + vv, atol=1e-5)  # no MLP on the parallel path
        q, k = _linear(n, attn.q_proj), _linear(n, attn.k_proj)
        hidden = original[0] + _linear(_heads_attention(q, k, v, heads), attn.out_proj)
        inner = _linear(_layer_norm(hidden, layer.layer_norm2), layer.mlp.fc1)
        mlp = _linear(inner * torch.sigmoid(1.702 * inner), layer.mlp.fc2)
        assert torch.allclose(new_original[0], hidden + mlp, atol=1e-5)


def test_without_dpam_the_vision_side_is_transformers_clip(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    x = images()
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=x).last_hidden_state
        image, patches, grid = encode_image(clip, x, 0, [24])
        assert grid == (8, 8)
        # the authors project the class token without ln_post
        assert torch.allclose(image, clip.visual_projection(ref[:, 0]), atol=1e-5)
        expected = clip.visual_projection(clip.vision_model.post_layernorm(ref[:, 1:]))
        assert torch.allclose(patches[0], expected, atol=1e-5)


def test_dpam_leaves_the_original_path_and_reads_it_for_vv(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    vision = clip.vision_model
    x = images()
    with torch.no_grad():
        hidden = vision(pixel_values=x, output_hidden_states=True).hidden_states  # [embeddings, block 1, ..., 24]
        plain, _, _ = encode_image(clip, x, 0, [24])
        image, patches, _ = encode_image(clip, x, 19, [5, 24])
        assert torch.allclose(image, plain, atol=1e-5)  # global feature from the untouched path
        project = lambda t: clip.visual_projection(vision.post_layernorm(t[:, 1:]))  # noqa: E731
        assert torch.allclose(patches[0], project(hidden[5]), atol=1e-5)  # block 5 precedes DPAM (6..24)
        _, (last,), _ = encode_image(clip, x, 2, [24])
        layers = vision.encoder.layers
        parallel = hidden[22]
        parallel = parallel + vv_attention(layers[22].self_attn, layers[22].layer_norm1(hidden[22]))
        parallel = parallel + vv_attention(layers[23].self_attn, layers[23].layer_norm1(hidden[23]))
        assert torch.allclose(last, project(parallel), atol=1e-5)


# ------------------------------------------------------------------------------------ maps and training


def test_only_the_prompts_learn(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    model = make_model(clip_and_tokenizer, feature_layers=[12, 24])
    assert set(model.state_dict()) == {f"prompts.{n}" for n, _ in model.prompts.named_parameters()}
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, 20:60, 30:70] = 1
    loss, _ = anomalyclip_loss(model(images()), masks, torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is None for p in clip.parameters())
    for name, p in model.prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_anomaly_map_is_the_mean_over_layers_of_half_abnormal_plus_one_minus_normal():
    """The authors sum over layers (a map in [0, L]); the mean ranks alike and stays on the [0, 1] threshold scale."""
    normal_a, abnormal_a = torch.tensor([[0.9, 0.2], [0.5, 0.1]]), torch.tensor([[0.1, 0.8], [0.5, 0.9]])
    normal_b, abnormal_b = torch.tensor([[0.6, 0.3], [0.7, 0.0]]), torch.tensor([[0.2, 0.7], [0.1, 0.4]])
    layers = [torch.stack([normal_a, abnormal_a])[None], torch.stack([normal_b, abnormal_b])[None]]
    expected = ((abnormal_a + 1 - normal_a) / 2 + (abnormal_b + 1 - normal_b) / 2) / 2
    assert torch.allclose(anomaly_map(layers, (2, 2))[0], expected)
    certain = [torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])[None]] * 3  # three layers, each sure of a defect
    assert torch.equal(anomaly_map(certain, (2, 2)), torch.ones(1, 2, 2))  # 1, not 3: fixed thresholds mean the same
    # upsampled bilinearly (align_corners False) before the formula: a 0 -> 1 step over 2 columns
    # becomes 0, 0.25, 0.75, 1 over 4
    step = [torch.stack([torch.zeros(2, 2), torch.tensor([[0.0, 1.0], [0.0, 1.0]])])[None]]
    row = (torch.tensor([0.0, 0.25, 0.75, 1.0]) + 1) / 2
    assert torch.allclose(anomaly_map(step, (4, 4))[0], row.expand(4, 4))


def test_forward_outputs_and_image_score(clip_and_tokenizer):
    model = make_model(clip_and_tokenizer, feature_layers=[6, 24])
    with torch.no_grad():
        out = model(images(3))
        assert [s.shape for s in out["similarity"]] == [(3, 2, 8, 8)] * 2
        assert torch.allclose(out["similarity"][0].sum(1), torch.ones(3, 8, 8))
        assert out["anomaly_map"].shape == (3, SIZE, SIZE)
        assert torch.allclose(out["anomaly_map"], anomaly_map(out["similarity"], (SIZE, SIZE)))
        assert torch.equal(image_score(out), out["image_probs"][:, 1])
        again = model(images(3), text=model.text_features())
        assert torch.allclose(again["anomaly_map"], out["anomaly_map"])


def test_loss_on_a_toy_case_matches_hand_values():
    abnormal = torch.tensor([[[0.9, 0.2], [0.1, 0.3]], [[0.5, 0.5], [0.5, 0.5]]])
    similarity = torch.stack([1 - abnormal, abnormal], dim=1)  # (2, 2, 2, 2): [normal, abnormal]
    masks = torch.tensor([[[1.0, 0], [0, 0]], [[0, 0], [0, 0]]])
    out = {"similarity": [similarity], "image_logits": torch.tensor([[2.0, 0.0], [0.0, 1.0]])}
    total, values = anomalyclip_loss(out, masks, torch.tensor([0, 1]), local_weight=4.0, focal_gamma=2.0)
    # dice(abnormal, mask): image 0 (1.8 + 1) / (1.5 + 1 + 1) = 0.8, image 1 1 / 3
    # dice(normal, 1 - mask): image 0 (4.8 + 1) / (2.5 + 3 + 1), image 1 (4 + 1) / (2 + 4 + 1)
    dice = (1 - (0.8 + 1 / 3) / 2) + (1 - (5.8 / 6.5 + 5 / 7) / 2)
    image = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    s = 1e-5
    p_true = [0.9, 0.8, 0.9, 0.7, 0.5, 0.5, 0.5, 0.5]  # probability of each pixel's own class
    pts = [(1 - s) * p + s * (1 - p) + s for p in p_true]
    focal = sum(-((1 - pt) ** 2) * math.log(pt) for pt in pts) / len(pts)
    assert values["dice"] == pytest.approx(dice, rel=1e-5)
    assert values["image"] == pytest.approx(image, rel=1e-5)
    assert values["focal"] == pytest.approx(focal, rel=2e-6)
    assert float(total) == pytest.approx(4 * (focal + dice) + image, rel=1e-5)


# --------------------------------------------------------------------------------- building and loading


def test_tiny_is_a_function_of_its_seed_and_frozen(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    again, other = build_tiny_clip(0, SIZE), build_tiny_clip(1, SIZE)
    weight = clip.vision_model.encoder.layers[3].self_attn.v_proj.weight
    assert torch.equal(weight, again.vision_model.encoder.layers[3].self_attn.v_proj.weight)
    assert not torch.equal(weight, other.vision_model.encoder.layers[3].self_attn.v_proj.weight)
    assert len(clip.vision_model.encoder.layers) == 24 and clip.config.vision_config.patch_size == 14
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.training


def test_a_saved_folder_loads_through_from_pretrained(clip_and_tokenizer, tmp_path):
    clip, tokenizer = clip_and_tokenizer
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loaded, loaded_tokenizer = load_clip(str(tmp_path / "clip"), tiny_seed=5, image_size=999)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    a = make_model(clip_and_tokenizer)
    b = make_model((loaded, loaded_tokenizer))
    assert torch.equal(a.prompts.input_ids, b.prompts.input_ids)
    with torch.no_grad():
        out_a, out_b = a(images()), b(images())
        assert torch.allclose(out_a["anomaly_map"], out_b["anomaly_map"])
        assert torch.allclose(out_a["image_probs"], out_b["image_probs"])


def test_other_input_sizes_interpolate_the_positions(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    table = clip.vision_model.embeddings.position_embedding.weight
    assert position_embeddings(clip, (8, 8)) is table
    resized = position_embeddings(clip, (10, 12))
    assert resized.shape == (1 + 120, table.shape[1]) and torch.equal(resized[0], table[0])
    small = build_tiny_clip(0, 28)  # a 2 x 2 grid whose positions we set by hand
    with torch.no_grad():
        small.vision_model.embeddings.position_embedding.weight[1:] = torch.tensor([0.0, 1, 0, 1])[:, None]
    # the authors resize bilinearly (align_corners False): columns 0, 1 -> 0, 0.25, 0.75, 1
    assert torch.allclose(position_embeddings(small, (2, 4))[1:, 0], torch.tensor([0.0, 0.25, 0.75, 1] * 2))
    model = make_model(clip_and_tokenizer)
    with torch.no_grad():
        out = model(images(2, 140, 168))
    assert out["similarity"][0].shape == (2, 2, 10, 12)
    assert out["anomaly_map"].shape == (2, 140, 168) and torch.isfinite(out["anomaly_map"]).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dpam_layers": 25}, "anomalyclip.dpam_layers"),
        ({"dpam_layers": -1}, "anomalyclip.dpam_layers"),
        ({"feature_layers": [0]}, "anomalyclip.feature_layers"),
        ({"feature_layers": [25]}, "anomalyclip.feature_layers"),
        ({"feature_layers": []}, "anomalyclip.feature_layers"),
    ],
)
def test_out_of_range_layers_are_refused_by_name(clip_and_tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_model(clip_and_tokenizer, **kwargs)


def test_normalize_takes_uint8_and_unit_floats_alike():
    x = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(normalize(x), normalize(x.float() / 255))
    white = normalize(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(white, (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
