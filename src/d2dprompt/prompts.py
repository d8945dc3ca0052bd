"""AnomalyCLIP-style learnable prompts run through a frozen CLIP text encoder.

Two prompts, 'X X ... X object.' (normal) and 'X X ... X damaged object.' (abnormal); the embeddings of
the `n_ctx` placeholder tokens are learned. Deep compound prompts (`t_n_ctx` learned vectors per layer)
overwrite hidden-state tokens 1..t_n_ctx at text-encoder layers 1..depth-1. Token positions come from the
tokenizer, widths and layer counts from the loaded config: nothing here assumes SD 1.5 or 2.1.

`prompts="joint"` puts both token groups in one sequence ('X..X object. X..X damaged object.') so one UNet
pass serves both; `paired` keeps one sequence per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

PLACEHOLDER = "X"  # one CLIP token; its positions mark where learned vectors go


@dataclass(frozen=True)
class TokenLayout:
    """Where things sit in the tokenized prompt sequence(s), found by token id, never by string."""

    input_ids: torch.Tensor  # (S, L): S = 2 sequences when paired, 1 when joint
    ctx_positions: tuple[torch.Tensor, torch.Tensor]  # normal, abnormal: (seq index, positions) of the X tokens
    normal_tokens: tuple[int, torch.Tensor]  # (sequence, token positions) whose attention forms the normal map
    abnormal_tokens: tuple[int, torch.Tensor]


def _ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def build_layout(tokenizer: CLIPTokenizer, n_ctx: int, object_word: str, abnormal_word: str, joint: bool) -> TokenLayout:
    (x_id,) = _ids(tokenizer, PLACEHOLDER)
    normal_body = [x_id] * n_ctx + _ids(tokenizer, f"{object_word}.")
    abnormal_body = [x_id] * n_ctx + _ids(tokenizer, f"{abnormal_word} {object_word}.")
    length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def sequence(*bodies: list[int]) -> list[int]:
        ids = [bos] + [t for body in bodies for t in body] + [eos]
        if len(ids) > length:
            raise ValueError(f"prompt.n_ctx={n_ctx}: prompts need {len(ids)} tokens, the tokenizer allows {length}")
        return ids + [pad] * (length - len(ids))

    first = torch.arange(1, 1 + len(normal_body))
    if joint:
        second = torch.arange(1 + len(normal_body), 1 + len(normal_body) + len(abnormal_body))
        ids = torch.tensor([sequence(normal_body, abnormal_body)])
        normal_seq, abnormal_seq = 0, 0
    else:
        second = torch.arange(1, 1 + len(abnormal_body))
        ids = torch.tensor([sequence(normal_body), sequence(abnormal_body)])
        normal_seq, abnormal_seq = 0, 1
    return TokenLayout(
        input_ids=ids,
        ctx_positions=(first[:n_ctx], second[:n_ctx]),
        normal_tokens=(normal_seq, first),
        abnormal_tokens=(abnormal_seq, second),
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
        return self.input_ids.shape[0] == 1

    def token_embeddings(self, text_encoder: CLIPTextModel) -> torch.Tensor:
        """(S, L, D) input embeddings with the learned context vectors in place of the X tokens."""
        base = getattr(text_encoder, "text_model", text_encoder)
        embeds = base.embeddings.token_embedding(self.input_ids)
        (normal_pos, abnormal_pos) = self.layout.ctx_positions
        normal_seq, abnormal_seq = self.layout.normal_tokens[0], self.layout.abnormal_tokens[0]
        embeds = embeds.index_put((torch.tensor(normal_seq), normal_pos.to(embeds.device)), self.ctx_normal.to(embeds.dtype))
        embeds = embeds.index_put(
            (torch.tensor(abnormal_seq), abnormal_pos.to(embeds.device)), self.ctx_abnormal.to(embeds.dtype)
        )
        return embeds

    def forward(self, text_encoder: CLIPTextModel) -> torch.Tensor:
        """Encoded prompts, (S, L, D): the encoder_hidden_states the UNet cross-attends to."""
        return encode(text_encoder, self.token_embeddings(text_encoder), list(self.compound), self.t_n_ctx)


def encode(text_encoder: CLIPTextModel, embeds: torch.Tensor, compound: list[torch.Tensor], t_n_ctx: int) -> torch.Tensor:
    """Run the frozen encoder layer by layer so compound prompts can overwrite tokens 1..t_n_ctx."""
    base = getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests it, 5.x does not
    hidden = base.embeddings(inputs_embeds=embeds)
    mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
    for index, layer in enumerate(base.encoder.layers):
        if 1 <= index <= len(compound):
            deep = compound[index - 1].to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], deep, hidden[:, 1 + t_n_ctx :]], dim=1)
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return base.final_layer_norm(hidden)
