"""AnomalyCLIP-style learnable prompts run through a frozen CLIP text encoder.

Two prompts, 'X X ... X object.' (normal) and 'X X ... X damaged object.' (abnormal); the embeddings of
the `n_ctx` placeholder tokens are learned. Deep compound prompts (`t_n_ctx` learned vectors per layer)
overwrite hidden-state tokens 1..t_n_ctx at text-encoder layers 1..depth-1, in both prompts alike.
Token positions come from the tokenizer, widths and layer counts from the loaded config: nothing here
assumes SD 1.5 or 2.1.

Each prompt is always encoded as its own sequence, as AnomalyCLIP does: a causal text encoder would
otherwise let the normal prompt shape the abnormal one, and deep prompts written at positions 1..t_n_ctx
of a shared sequence would reach the first prompt only. The two layouts differ only in what the UNet
reads: `paired` runs one UNet pass per prompt (two softmaxes over 77 tokens each), `joint`
concatenates the two encoded sequences into one context of twice the length (cross-attention takes
any context length), so one UNet pass and one softmax serve both prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

PLACEHOLDER = "X"  # one CLIP token; its positions mark where learned vectors go


@dataclass(frozen=True)
class TokenLayout:
    """Where things sit, found by token id, never by string.

    input_ids is (2, L): row 0 the normal prompt, row 1 the abnormal one, each tokenized alone.
    ctx_positions are the positions of the X tokens within each prompt's own row. normal_tokens /
    abnormal_tokens are (sequence index, positions) in the context the UNet reads (`joint`: one
    sequence of 2L tokens, the abnormal prompt from L on; `paired`: two sequences of L).
    """

    input_ids: torch.Tensor
    ctx_positions: tuple[torch.Tensor, torch.Tensor]  # normal, abnormal: positions of the X tokens in their row
    normal_tokens: tuple[int, torch.Tensor]  # content tokens (context + words) whose attention forms the normal map
    abnormal_tokens: tuple[int, torch.Tensor]
    joint: bool


def _ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def build_layout(tokenizer: CLIPTokenizer, n_ctx: int, object_word: str, abnormal_word: str, joint: bool) -> TokenLayout:
    (x_id,) = _ids(tokenizer, PLACEHOLDER)
    normal_body = [x_id] * n_ctx + _ids(tokenizer, f"{object_word}.")
    abnormal_body = [x_id] * n_ctx + _ids(tokenizer, f"{abnormal_word} {object_word}.")
    length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def sequence(body: list[int]) -> list[int]:
        ids = [bos] + body + [eos]
        if len(ids) > length:
            raise ValueError(f"prompt.n_ctx={n_ctx}: a prompt needs {len(ids)} tokens, the tokenizer allows {length}")
        return ids + [pad] * (length - len(ids))

    normal = torch.arange(1, 1 + len(normal_body))
    abnormal = torch.arange(1, 1 + len(abnormal_body))
    return TokenLayout(
        input_ids=torch.tensor([sequence(normal_body), sequence(abnormal_body)]),
        ctx_positions=(normal[:n_ctx], abnormal[:n_ctx]),
        normal_tokens=(0, normal),
        abnormal_tokens=(0, abnormal + length) if joint else (1, abnormal),
        joint=joint,
    )


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, L, L) mask: CLIP's text encoder is causal."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)[None, None]


class PromptLearner(nn.Module):
    """The only trainable part: normal/abnormal context vectors and deep compound prompts."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        n_ctx: int,
        t_n_ctx: int,
        depth: int,
        object_word: str,
        abnormal_word: str,
        init_std: float,
        joint: bool,
    ):
        super().__init__()
        width = text_encoder.config.hidden_size
        n_layers = text_encoder.config.num_hidden_layers
        if not 1 <= depth <= n_layers:
            raise ValueError(f"prompt.depth={depth}: must lie in 1..{n_layers} (text-encoder layers)")
        self.layout = build_layout(tokenizer, n_ctx, object_word, abnormal_word, joint)
        if t_n_ctx > int(self.layout.ctx_positions[0].numel()):
            raise ValueError(f"prompt.t_n_ctx={t_n_ctx}: must not exceed prompt.n_ctx={n_ctx}")
        self.t_n_ctx = t_n_ctx
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self.ctx_abnormal = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self.compound = nn.ParameterList(
            [nn.Parameter(torch.randn(t_n_ctx, width) * init_std) for _ in range(depth - 1)]
        )
        self.register_buffer("input_ids", self.layout.input_ids, persistent=False)

    @property
    def joint(self) -> bool:
        return self.layout.joint

    def token_embeddings(self, text_encoder: CLIPTextModel) -> torch.Tensor:
        """(2, L, D) input embeddings with the learned context vectors in place of the X tokens."""
        base = getattr(text_encoder, "text_model", text_encoder)
        embeds = base.embeddings.token_embedding(self.input_ids)
        normal_pos, abnormal_pos = (p.to(embeds.device) for p in self.layout.ctx_positions)
        embeds = embeds.index_put((torch.tensor(0), normal_pos), self.ctx_normal.to(embeds.dtype))
        return embeds.index_put((torch.tensor(1), abnormal_pos), self.ctx_abnormal.to(embeds.dtype))

    def encode_prompts(self, text_encoder: CLIPTextModel) -> torch.Tensor:
        """(2, L, D): each prompt encoded on its own, with the same deep prompts."""
        return encode(text_encoder, self.token_embeddings(text_encoder), list(self.compound), self.t_n_ctx)

    def forward(self, text_encoder: CLIPTextModel) -> torch.Tensor:
        """The encoder_hidden_states the UNet cross-attends to: (2, L, D) paired, (1, 2L, D) joint."""
        states = self.encode_prompts(text_encoder)
        return states.reshape(1, -1, states.shape[-1]) if self.joint else states


def encode(text_encoder: CLIPTextModel, embeds: torch.Tensor, compound: list[torch.Tensor], t_n_ctx: int) -> torch.Tensor:
    """Run the frozen encoder layer by layer so compound prompts can overwrite tokens 1..t_n_ctx.

    Written for transformers 5 (pyproject pins >=5), whose CLIP encoder layer takes (hidden, additive
    mask); 4.x layers need a separate causal-mask argument and are not supported.
    """
    base = getattr(text_encoder, "text_model", text_encoder)  # CLIPTextModel wraps the transformer; accept either
    hidden = base.embeddings(inputs_embeds=embeds)
    mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
    for index, layer in enumerate(base.encoder.layers):
        if 1 <= index <= len(compound):
            deep = compound[index - 1].to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], deep, hidden[:, 1 + t_n_ctx :]], dim=1)
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return base.final_layer_norm(hidden)
