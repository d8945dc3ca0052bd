"""D2D-Prompt's (and D2D's) exported graph: the VAE encoder, the UNet up to the last captured cross-attention layer
and the map head, with the prompts' text-encoder states and the seed's noise held as constants. Pure torch, no I/O.

The text encoder runs once, here: after training the prompts are fixed, so its output is too. The UNet stops at the
last captured layer as it does in evaluate (attention.EarlyExit); the tracer records only what ran, so the graph
holds no layer after it. A few-shot run's graph carries its category's memory and fuses as evaluate does.
"""

from __future__ import annotations

import torch
from torch import nn

from d2dprompt.core.eval.maps import finish_maps
from d2dprompt.methods.base import category_index
from d2dprompt.methods.d2dprompt.model import D2DSegmenter, fixed_noise
from d2dprompt.methods.graph import latents_of


class PromptGraph(nn.Module):
    def __init__(self, segmenter: D2DSegmenter, record: dict, scoring, category: str | None, image_size: int):
        super().__init__()
        self.segmenter, self.scoring = segmenter, scoring
        with torch.no_grad():
            self.register_buffer("states", segmenter.prompt_states().detach())
            shape = latents_of(segmenter.sd.vae, torch.zeros(1, 3, image_size, image_size)).shape[1:]
        self.register_buffer("noise", fixed_noise(1, tuple(shape), record["model"]["noise_seed"]))
        memory = getattr(segmenter, "memory", None) or {}
        self.memory, self.stats = None, None
        if memory:
            chosen = record["categories"][category_index(record, category, record["method"])]
            self.memory, self.stats = memory[chosen], record["memory"][chosen]
            self.weight = record["fewshot"]["fusion"]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from d2dprompt.methods.d2dprompt.memory import maps_and_features
        from d2dprompt.methods.patch_memory import distance_map, fuse

        latents = latents_of(self.segmenter.sd.vae, pixels)
        noise = self.noise.expand(latents.shape[0], -1, -1, -1)
        if self.memory is None:
            latent_map = self.segmenter(latents, noise, self.states)["anomaly"]
        else:
            prompt_map, features = maps_and_features(self.segmenter, latents, noise, self.states)
            memory_map = distance_map(features, self.memory, self.segmenter.captured, tuple(latents.shape[-2:]))
            latent_map = fuse(prompt_map, memory_map, self.weight, self.stats["prompt_stats"], self.stats["memory_stats"])
        s = self.scoring
        return finish_maps(latent_map, s.map_size, s.sigma, s.score, s.top_percent, s.image_top_percent)
