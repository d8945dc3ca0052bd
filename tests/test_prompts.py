import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from d2dprompt.core.runtime.config import PromptParams
from d2dprompt.methods.prompt_learner import PromptLearner, build_layout, encode


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
    length = tiny.tokenizer.model_max_length
    assert layout.input_ids.shape == (2, length)  # each prompt is still tokenized alone
    assert layout.normal_tokens[0] == layout.abnormal_tokens[0] == 0
    normal, abnormal = set(layout.normal_tokens[1].tolist()), set(layout.abnormal_tokens[1].tolist())
    assert normal and abnormal and max(normal) < length <= min(abnormal)


def test_joint_prompts_encode_each_prompt_as_paired_does(tiny):
    """Joint differs from paired only in the UNet reading both prompts in one softmax."""
    torch.manual_seed(0)
    paired = make_learner(tiny.tokenizer, tiny.text_encoder, joint=False)
    torch.manual_seed(0)
    joint = make_learner(tiny.tokenizer, tiny.text_encoder, joint=True)
    with torch.no_grad():
        for p in paired.compound:  # deep prompts large enough that a wrong placement would show
            p.normal_(0, 1)
        joint.load_state_dict(paired.state_dict())
        states_paired, states_joint = paired(tiny.text_encoder), joint(tiny.text_encoder)
    length = tiny.tokenizer.model_max_length
    assert states_joint.shape == (1, 2 * length, states_paired.shape[-1])
    assert (states_joint[0, :length] - states_paired[0]).abs().max() < 1e-5
    assert (states_joint[0, length:] - states_paired[1]).abs().max() < 1e-5


def test_deep_prompts_reach_both_prompts(tiny):
    learner = make_learner(tiny.tokenizer, tiny.text_encoder, joint=True)
    with torch.no_grad():
        before = learner(tiny.text_encoder)
        learner.compound[-1].normal_(0, 1)  # the last deep prompt stays in place up to the output
        after = learner(tiny.text_encoder)
    length = tiny.tokenizer.model_max_length
    abnormal_pos = learner.layout.abnormal_tokens[1]
    assert (after[0, abnormal_pos] - before[0, abnormal_pos]).abs().max() > 1e-3
    assert (after[0, learner.layout.normal_tokens[1]] - before[0, learner.layout.normal_tokens[1]]).abs().max() > 1e-3
    assert abnormal_pos.min() >= length


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
