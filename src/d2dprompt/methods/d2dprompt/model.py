"""D2D-Prompt's torch model: frozen SD + learnable prompts -> cross-attention anomaly maps. No I/O.

One forward: encode the prompts with the frozen text encoder, noise the VAE latents to `timestep`
with per-image fixed noise, run the frozen UNet (gradients enabled, weights frozen) and aggregate the
captured cross-attention into normal / abnormal / anomaly maps at latent resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from d2dprompt.methods.d2dprompt.attention import (
    EarlyExit,
    aggregate_maps,
    attention_probs,
    install_capture,
)
from d2dprompt.core.models import FrozenSD
from d2dprompt.methods.prompt_learner import PromptLearner


def fixed_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(count, *shape): one Gaussian noise draw per seed, the same for every image.

    Design choice: the noise added at `model.timestep` does not depend on which image it is (path,
    name or position in a batch), so a map is a function of the pixels and the seed alone and the same
    image gets the same map and score in training, evaluate and predict, under any file name.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).expand(count, *shape).contiguous()


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

    @property
    def passes(self) -> int:
        """UNet passes per image: one per prompt when paired, one when joint."""
        return 1 if self.prompts.joint else 2

    def _unet_batch(self, latents: torch.Tensor, noise: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_t = self.noised(latents, noise)
        batch = latents.shape[0]
        if self.passes == 2:  # normal prompt on the first half of the batch, abnormal on the second
            return torch.cat([z_t, z_t]), states.repeat_interleave(batch, dim=0)
        return z_t, states.expand(batch, -1, -1)

    def _maps(self, probs: dict[str, torch.Tensor], latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        layout = self.prompts.layout
        return aggregate_maps(probs, self.captured, latent_hw, layout.normal_tokens, layout.abnormal_tokens, paired=self.passes == 2)

    def forward(self, latents: torch.Tensor, noise: torch.Tensor, states: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Full mode. latents (B, C, h, w) already scaled by the VAE factor; noise like latents; `states` the prompts'
        text-encoder output when it is fixed (an exported graph holds it), else computed here."""
        self.run_unet(*self._unet_batch(latents, noise, self.prompt_states() if states is None else states))
        return self._maps(self.recorder.probs, tuple(latents.shape[-2:]))

    @torch.no_grad()
    def compute_queries(self, latents: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Queries of each captured layer under the current prompts: name -> (passes, B, heads, HW, d).

        With the prompts fixed they depend on the image alone, so cached-query training can reuse them.
        """
        _, queries = self.maps_and_queries(latents, noise)
        batch = latents.shape[0]
        return {name: q.reshape(self.passes, batch, *q.shape[1:]) for name, q in queries.items()}

    @torch.no_grad()
    def maps_and_queries(self, latents: torch.Tensor, noise: torch.Tensor, states: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One UNet pass -> (the maps `forward` gives, the queries of each captured layer (passes x B, heads, HW, d))."""
        self.recorder.keep_queries = True
        try:
            self.run_unet(*self._unet_batch(latents, noise, self.prompt_states() if states is None else states))
        finally:
            self.recorder.keep_queries = False
        return self._maps(self.recorder.probs, tuple(latents.shape[-2:])), self.recorder.queries

    def forward_cached(self, queries: dict[str, torch.Tensor], latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Cached mode: only the text encoder, `to_k` of each captured layer and the softmax run.

        Identical to `forward` while the prompts equal those the queries were computed with; an
        approximation once they move (the UNet's own features no longer see the new prompts).
        """
        states = self.prompt_states()
        probs = {}
        for name in self.captured:
            attn = self.cross_attention[name]
            keys_in = attn.norm_encoder_hidden_states(states) if attn.norm_cross else states
            key = attn.to_k(keys_in)
            query = queries[name]
            key = key.view(key.shape[0], key.shape[1], attn.heads, -1).transpose(1, 2)  # (S, heads, L, d)
            per_pass = [attention_probs(query[i], key[i : i + 1], attn.scale) for i in range(self.passes)]
            probs[name] = torch.cat(per_pass).mean(dim=1)
        return self._maps(probs, latent_hw)

    @property
    def cross_attention(self) -> dict:
        return {name: self.sd.unet.get_submodule(name.removesuffix(".processor")) for name in self.captured}

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
    """From the `prompt`, `attention` and `model` params blocks (checked by config.py)."""
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


@torch.no_grad()
def latent_maps(segmenter: D2DSegmenter, latents: torch.Tensor, noise_seed: int, scoring, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of stored latents -> (maps at scoring.map_size, image scores by scoring.score), on the CPU.

    The same image gets the same score everywhere: the latents come at the dtype the latents stage stores, the UNet
    runs under the same autocast (`model.precision`) and the noise is the seed's one draw (`fixed_noise`).
    """
    from d2dprompt.core.eval.maps import finish_maps
    from d2dprompt.core.models import autocast

    batch = latents.float().to(device)
    noise = fixed_noise(batch.shape[0], tuple(batch.shape[1:]), noise_seed).to(device)
    with autocast(device, scoring.precision):
        latent_map = segmenter(batch, noise)["anomaly"]
    maps, scores = finish_maps(latent_map, scoring.map_size, scoring.sigma, scoring.score, scoring.top_percent, scoring.image_top_percent)
    return maps.cpu(), scores.cpu()
