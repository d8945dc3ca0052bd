"""D2D, the idea D2D-Prompt starts from: fixed hand-written prompts, nothing learned. Pure torch, no I/O.

The frozen text encoder reads a normal and an abnormal sentence ("a photo of a flawless object" /
"a photo of a damaged object"); the anomaly map is the cross-attention on the listed content words,
through the same capture, aggregation and map code as D2D-Prompt (segmenter.D2DSegmenter takes this
module in place of the learned prompts). Token positions come from the tokenizer, by token id.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from d2dprompt.methods.prompt_learner import TokenLayout, encode


def _ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def word_positions(tokenizer: CLIPTokenizer, sentence: str, words: list[str]) -> torch.Tensor:
    """Positions (after the start token) of every token of `words` inside `sentence`, found by id."""
    body = _ids(tokenizer, sentence)
    found: list[int] = []
    for word in words:
        ids = _ids(tokenizer, word)
        starts = [i for i in range(len(body) - len(ids) + 1) if body[i : i + len(ids)] == ids]
        if not starts:
            raise ValueError(f"d2d: {word!r} is not a token sequence of {sentence!r}")
        found.extend(1 + starts[0] + j for j in range(len(ids)))
    return torch.tensor(sorted(set(found)))


def fixed_layout(tokenizer: CLIPTokenizer, normal: str, abnormal: str, normal_words: list[str], abnormal_words: list[str], joint: bool) -> TokenLayout:
    """The layout D2DSegmenter reads: both sentences tokenized alone, maps on the content words."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sequence(text: str) -> list[int]:
        ids = [tokenizer.bos_token_id] + _ids(tokenizer, text) + [tokenizer.eos_token_id]
        if len(ids) > length:
            raise ValueError(f"d2d: {text!r} needs {len(ids)} tokens, the tokenizer allows {length}")
        return ids + [pad] * (length - len(ids))

    abnormal_pos = word_positions(tokenizer, abnormal, abnormal_words)
    empty = torch.zeros(0, dtype=torch.long)
    return TokenLayout(
        input_ids=torch.tensor([sequence(normal), sequence(abnormal)]),
        ctx_positions=(empty, empty),  # nothing is learned
        normal_tokens=(0, word_positions(tokenizer, normal, normal_words)),
        abnormal_tokens=(0, abnormal_pos + length) if joint else (1, abnormal_pos),
        joint=joint,
    )


class FixedPrompts(nn.Module):
    """Stands where PromptLearner stands, with no parameters: the text encoder's plain encoding."""

    def __init__(self, tokenizer: CLIPTokenizer, normal: str, abnormal: str, normal_words: list[str], abnormal_words: list[str], joint: bool):
        super().__init__()
        self.layout = fixed_layout(tokenizer, normal, abnormal, normal_words, abnormal_words, joint)
        self.register_buffer("input_ids", self.layout.input_ids, persistent=False)

    @property
    def joint(self) -> bool:
        return self.layout.joint

    def encode_prompts(self, text_encoder: CLIPTextModel) -> torch.Tensor:
        """(2, L, D): each sentence encoded on its own (no deep prompts)."""
        base = getattr(text_encoder, "text_model", text_encoder)
        return encode(text_encoder, base.embeddings.token_embedding(self.input_ids), [], 0)

    def forward(self, text_encoder: CLIPTextModel) -> torch.Tensor:
        states = self.encode_prompts(text_encoder)
        return states.reshape(1, -1, states.shape[-1]) if self.joint else states
