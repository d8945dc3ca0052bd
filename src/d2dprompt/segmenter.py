"""The torch model: frozen SD + learnable prompts -> cross-attention anomaly maps. No I/O.

One forward: encode the prompts with the frozen text encoder, noise the VAE latents to `timestep`
with per-image fixed noise, run the frozen UNet (gradients enabled, weights frozen) and aggregate the
captured cross-attention into normal / abnormal / anomaly maps at latent resolution.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from d2dprompt.attention import EarlyExit, aggregate_maps, install_capture
from d2dprompt.models import FrozenSD
from d2dprompt.prompts import PromptLearner


def fixed_noise(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-image Gaussian noise that depends only on (seed, image key): maps are deterministic."""
    out = torch.empty((len(keys), *shape))
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        out[i] = torch.randn(shape, generator=gen)
    return out


class D2DSegmenter(nn.Module):
    """Only `self.prompts` holds trainable parameters; the SD parts are frozen and kept out of state_dict."""

    def __init__(self, sd: FrozenSD, prompts: PromptLearner, levels: list[int], timestep: int, early_exit: bool = True):
        super().__init__()
        self.prompts = prompts
        self.__dict__["sd"] = sd  # a plain attribute: frozen weights are not ours to save
        n_steps = sd.scheduler.config.num_train_timesteps
        if not 0 <= timestep < n_steps:
            raise ValueError(f"model.timestep={timestep}: must lie in 0..{n_steps - 1}")
        self.timestep = timestep
        self.recorder, self.captured = install_capture(sd.unet, levels, early_exit)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = torch.full((latents.shape[0],), self.timestep, dtype=torch.long)
        return self.sd.scheduler.add_noise(latents, noise.to(latents), t).to(latents.dtype)

    def prompt_states(self) -> torch.Tensor:
        return self.prompts(self.sd.text_encoder)

    def forward(self, latents: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """latents (B, C, h, w) already scaled by the VAE factor; noise like latents."""
        states = self.prompt_states()
        z_t = self.noised(latents, noise)
        batch = latents.shape[0]
        if not self.prompts.joint:  # normal prompt on the first half of the batch, abnormal on the second
            z_t = torch.cat([z_t, z_t])
            states = states.repeat_interleave(batch, dim=0)
        else:
            states = states.expand(batch, -1, -1)
        self.run_unet(z_t, states)
        layout = self.prompts.layout
        return aggregate_maps(
            self.recorder.probs,
            self.captured,
            tuple(latents.shape[-2:]),
            layout.normal_tokens,
            layout.abnormal_tokens,
            paired=not self.prompts.joint,
        )

    def run_unet(self, z_t: torch.Tensor, states: torch.Tensor) -> None:
        self.recorder.reset()
        t = torch.full((z_t.shape[0],), self.timestep, device=z_t.device)
        try:
            self.sd.unet(z_t, t, encoder_hidden_states=states.to(z_t.dtype))
        except EarlyExit:
            pass
        missing = set(self.captured) - set(self.recorder.probs)
        if missing:
            raise RuntimeError(f"cross-attention layers never ran: {sorted(missing)}")


def build_segmenter(sd: FrozenSD, prompt, attention, model, early_exit: bool = True) -> D2DSegmenter:
    """From the `prompt`, `attention` and `model` params blocks."""
    if attention.prompts not in ("paired", "joint"):
        raise ValueError(f"attention.prompts={attention.prompts!r}: expected paired or joint")
    learner = PromptLearner(
        sd.tokenizer,
        sd.text_encoder,
        n_ctx=prompt.n_ctx,
        t_n_ctx=prompt.t_n_ctx,
        depth=prompt.depth,
        object_word=prompt.object_word,
        abnormal_word=prompt.abnormal_word,
        init_std=prompt.init_std,
        joint=attention.prompts == "joint",
    )
    return D2DSegmenter(sd, learner, attention.levels, model.timestep, early_exit)
