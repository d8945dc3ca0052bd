"""Cross-attention capture inside the autograd graph, and its aggregation into normal/abnormal maps.

Only the cross-attention layers at the configured levels get `CaptureProcessor` (explicit softmax,
probabilities recorded); every other layer keeps the UNet's fast default processor. Level k is the
latent side divided by 2**k, read off the UNet's block structure, so no resolution is hard-coded.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

EPS = 1e-6  # keeps the abnormal / (abnormal + normal) ratio finite where both masses vanish


class EarlyExit(Exception):
    """Raised by the last capture processor: the UNet layers after it feed nothing we read."""


class AttentionRecorder:
    """Collects head-averaged attention probabilities, (B, HW, L), of the captured layers for one forward."""

    def __init__(self, names: list[str], early_exit: bool = True):
        self.names = names
        self.early_exit = early_exit
        self.probs: dict[str, torch.Tensor] = {}
        self.queries: dict[str, torch.Tensor] = {}
        self.keep_queries = False

    def reset(self) -> None:
        self.probs, self.queries = {}, {}

    def record(self, name: str, probs: torch.Tensor, query: torch.Tensor) -> None:
        self.probs[name] = probs.mean(dim=1)
        if self.keep_queries:
            self.queries[name] = query.detach()
        if self.early_exit and len(self.probs) == len(self.names):
            raise EarlyExit


class CaptureProcessor:
    """Diffusers cross-attention with the softmax computed explicitly and kept in the graph."""

    def __init__(self, recorder: AttentionRecorder, name: str):
        self.recorder = recorder
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None or attn.spatial_norm is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: capture supports plain cross-attention only")
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch, tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states).view(batch, tokens, attn.heads, -1).transpose(1, 2)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        key = key.view(key.shape[0], -1, attn.heads, query.shape[-1]).transpose(1, 2)
        value = value.view(value.shape[0], -1, attn.heads, query.shape[-1]).transpose(1, 2)
        probs = attention_probs(query, key, attn.scale)
        out = (probs @ value.expand(batch, -1, -1, -1)).transpose(1, 2).reshape(batch, tokens, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self.recorder.record(self.name, probs, query)
        return out


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) in fp32: (B, heads, N, d) x (B or 1, heads, L, d) -> (B, heads, N, L).

    Autocast is switched off around the matmul: under an enabled autocast `.float()` alone would be
    undone (the matmul runs in bf16 again) and the maps, which are the detector's output, would move
    by several percent.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        logits = (query.float() @ key.float().transpose(-1, -2)) * scale
        return logits.softmax(dim=-1)


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def cross_attention_levels(unet: UNet2DConditionModel) -> dict[str, int]:
    """Processor name -> level for every cross-attention layer, in the UNet's execution order."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    levels: dict[str, int] = {}
    for name, module in unet.attn_processors.items():
        if not name.endswith("attn2.processor"):
            continue  # attn1 is self-attention in SD's transformer blocks
        match = _BLOCK.match(name)
        if match is None:
            raise ValueError(f"{name}: cross-attention outside down/mid/up blocks is not supported")
        kind, index = match.group(1), match.group(2)
        levels[name] = int(index) if kind == "down_blocks" else n_down - 1 if kind is None else n_up - 1 - int(index)
    order = {"down_blocks": 0, None: 1, "up_blocks": 2}
    return dict(sorted(levels.items(), key=lambda kv: (order[_BLOCK.match(kv[0]).group(1)], kv[0])))


def install_capture(unet: UNet2DConditionModel, levels: list[int], early_exit: bool = True) -> tuple[AttentionRecorder, dict[str, int]]:
    """Swap in capture processors at `levels`; returns the recorder and name -> level of captured layers."""
    available = cross_attention_levels(unet)
    missing = sorted(set(levels) - set(available.values()))
    if missing:
        raise ValueError(
            f"attention.levels: {missing} have no cross-attention layer in this UNet "
            f"(levels with one: {sorted(set(available.values()))})"
        )
    captured = {name: level for name, level in available.items() if level in levels}
    recorder = AttentionRecorder(list(captured), early_exit)
    processors = {}
    for name, proc in unet.attn_processors.items():
        if name in captured:
            processors[name] = CaptureProcessor(recorder, name)
        elif isinstance(proc, CaptureProcessor):  # left by an earlier install: back to the fast default
            processors[name] = AttnProcessor2_0()
        else:
            processors[name] = proc
    unet.set_attn_processor(processors)  # diffusers empties the dict passed in
    return recorder, captured


def aggregate_maps(
    probs: dict[str, torch.Tensor],
    captured: dict[str, int],
    latent_hw: tuple[int, int],
    normal: tuple[int, torch.Tensor],
    abnormal: tuple[int, torch.Tensor],
    paired: bool,
) -> dict[str, torch.Tensor]:
    """Turn recorded attention into maps at latent resolution.

    For each captured layer, a prompt's raw map is the attention mass its content tokens (learned
    context + words, not start/end/padding) receive at each pixel; layers are upsampled to the latent
    size and averaged within a level, levels are averaged. The anomaly map is the per-pixel share
    abnormal / (abnormal + normal). Paired runs carry the normal prompt in the first half of the batch.
    """
    height, width = latent_hw
    per_level: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, level in captured.items():
        p = probs[name]
        if paired:
            half = p.shape[0] // 2
            p_normal, p_abnormal = p[:half], p[half:]
        else:
            p_normal = p_abnormal = p
        side_h, side_w = height >> level, width >> level
        mass_n = p_normal[..., normal[1].to(p.device)].sum(-1).view(-1, 1, side_h, side_w)
        mass_a = p_abnormal[..., abnormal[1].to(p.device)].sum(-1).view(-1, 1, side_h, side_w)
        if level:
            mass_n = F.interpolate(mass_n, size=(height, width), mode="bilinear", align_corners=False)
            mass_a = F.interpolate(mass_a, size=(height, width), mode="bilinear", align_corners=False)
        per_level.setdefault(level, []).append((mass_n[:, 0], mass_a[:, 0]))
    normal_levels = torch.stack([torch.stack([n for n, _ in maps]).mean(0) for maps in per_level.values()], 1)
    abnormal_levels = torch.stack([torch.stack([a for _, a in maps]).mean(0) for maps in per_level.values()], 1)
    anomaly_levels = abnormal_levels / (abnormal_levels + normal_levels + EPS)
    mass_normal, mass_abnormal = normal_levels.mean(1), abnormal_levels.mean(1)
    return {
        "normal_mass": mass_normal,  # (B, h, w) raw attention mass on the normal prompt
        "abnormal_mass": mass_abnormal,
        "anomaly": mass_abnormal / (mass_abnormal + mass_normal + EPS),  # (B, h, w) in [0, 1]
        "anomaly_levels": anomaly_levels,  # (B, levels, h, w), for the consistency loss
    }
