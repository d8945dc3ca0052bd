import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from d2dprompt.config import PromptParams
from d2dprompt.prompts import PromptLearner, build_layout, encode


def make_learner(tokenizer, encoder, **overrides) -> PromptLearner:
    """The prompt block's defaults, paired (one sequence per prompt) unless overridden."""
    return PromptLearner(tokenizer, encoder, **{**PromptParams().model_dump(), "joint": False, **overrides})


def test_manual_encoder_equals_transformers_forward(tiny):
    learner = make_learner(tiny.tokenizer, tiny.text_encoder, depth=1)
    with torch.no_grad():
        embeds = tiny.text_encoder.embeddings.token_embedding(learner.input_ids)
        ours = encode(tiny.text_encoder, embeds, [], learner.t_n_ctx)
        reference = tiny.text_encoder(learner.input_ids).last_hidden_state
    assert torch.allclose(ours, reference, atol=1e-6)


def test_paired_layout_positions_come_from_the_tokenizer(tiny):
    tok = tiny.tokenizer
    layout = build_layout(tok, n_ctx=12, object_word="object", abnormal_word="damaged", joint=False)
    ids = layout.input_ids
    assert ids.shape == (2, tok.model_max_length)
    (x_id,) = tok("X", add_special_tokens=False).input_ids
    assert (ids[0, layout.ctx_positions[0]] == x_id).all() and (ids[1, layout.ctx_positions[1]] == x_id).all()
    assert ids[0, 0] == tok.bos_token_id
    normal_seq, normal_pos = layout.normal_tokens
    abnormal_seq, abnormal_pos = layout.abnormal_tokens
    # content tokens stop right before the end-of-text token, and 'damaged' is among the abnormal ones
    assert ids[normal_seq, normal_pos[-1] + 1] == tok.eos_token_id
    assert ids[abnormal_seq, abnormal_pos[-1] + 1] == tok.eos_token_id
    (damaged,) = tok("damaged", add_special_tokens=False).input_ids
    assert damaged in ids[abnormal_seq, abnormal_pos].tolist()
    assert damaged not in ids[normal_seq, normal_pos].tolist()


def test_joint_layout_keeps_groups_apart(tiny):
    layout = build_layout(tiny.tokenizer, 12, "object", "damaged", joint=True)
    assert layout.input_ids.shape[0] == 1
    normal, abnormal = set(layout.normal_tokens[1].tolist()), set(layout.abnormal_tokens[1].tolist())
    assert normal and abnormal and not normal & abnormal
    assert max(normal) < min(abnormal)


def test_learned_vectors_replace_the_placeholders(tiny):
    learner = make_learner(tiny.tokenizer, tiny.text_encoder)
    embeds = learner.token_embeddings(tiny.text_encoder)
    assert torch.equal(embeds[0, learner.layout.ctx_positions[0]], learner.ctx_normal)
    assert torch.equal(embeds[1, learner.layout.ctx_positions[1]], learner.ctx_abnormal)


def test_compound_prompts_change_the_output_and_receive_gradients(tiny):
    learner = make_learner(tiny.tokenizer, tiny.text_encoder, depth=9)
    assert len(learner.compound) == 8
    states = learner(tiny.text_encoder)
    states.sum().backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sizes_follow_the_text_encoder_config(tiny):
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=96, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4))
    learner = make_learner(tiny.tokenizer, encoder, depth=5)
    assert learner.ctx_normal.shape == (12, 96)
    assert learner(encoder).shape == (2, 77, 96)
    with pytest.raises(ValueError, match=r"prompt.depth=6: must lie in 1..5"):
        make_learner(tiny.tokenizer, encoder, depth=6)


def test_too_many_context_tokens_are_refused(tiny):
    with pytest.raises(ValueError, match="prompt.n_ctx=80"):
        make_learner(tiny.tokenizer, tiny.text_encoder, n_ctx=80)
    with pytest.raises(ValueError, match="prompt.t_n_ctx=13"):
        make_learner(tiny.tokenizer, tiny.text_encoder, n_ctx=12, t_n_ctx=13)
