"""D2D-Prompt, this project's method: learnable prompts read through a frozen Stable Diffusion UNet's cross-attention.

model.py (the segmenter: frozen SD + prompts -> maps), attention.py (capturing cross-attention in the graph),
loss.py (the loss terms), query_cache.py (cached-query training), train.py (train@d2dprompt), memory.py (few-shot: a
memory of the UNet's features of `fewshot.k` normal images per category, fused with the prompt maps). It reads the
shared model / prompt / attention / loss / train / fewshot blocks and has no block of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2dprompt.methods.base import Method, Scoring, TrainJob

if TYPE_CHECKING:
    import numpy as np
    import torch

    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.d2dprompt.model import D2DSegmenter


def memory_maps(k: int, mutual: bool, fusion: float) -> str | None:
    """What few-shot maps are when they hold a memory's share (feature distances, not in [0, 1]); None otherwise."""
    if (k or mutual) and fusion:
        return f"{f'fewshot.k={k}' if k else 'fewshot.mutual'} reads memory maps (feature distances, not in [0, 1])"
    return None


class D2DPromptMethod(Method):
    name = "d2dprompt"
    record_blocks = ("model", "prompt", "attention", "loss", "train", "fewshot")
    reads = "latents"
    multi_process = True

    def check(self, params: CoreParams) -> None:
        """A memory map is a feature distance, not a share in [0, 1]: a fixed threshold on the map scale would misread it."""
        from d2dprompt.core.runtime.config import Invalid

        why = memory_maps(params.fewshot.k, params.fewshot.mutual, params.fewshot.fusion)
        if why and params.evaluate.threshold == "fixed":
            raise Invalid("evaluate.threshold", f"{why}; fit thresholds on the validation split (f1) or set fewshot.fusion: 0")

    def off_unit_scale(self, record: dict) -> str | None:
        fs = record.get("fewshot", {})
        return memory_maps(fs.get("k", 0), fs.get("mutual", False), fs.get("fusion", 0))

    def scores_together(self, record: dict) -> bool:
        return bool(record.get("fewshot", {}).get("mutual"))

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        from d2dprompt.methods.d2dprompt.train import run

        return run(self, params, job)

    def build(self, params: CoreParams, record: dict) -> D2DSegmenter:
        from d2dprompt.core.models import load_frozen
        from d2dprompt.methods.d2dprompt.model import build_segmenter

        sd = load_frozen(params.model.pretrained, params.model.tiny_seed)
        return build_segmenter(sd, params.prompt, params.attention, params.model)

    def load_weights(self, model: D2DSegmenter, weights: dict[str, torch.Tensor], record: dict) -> D2DSegmenter:
        """The prompt vectors, and the few-shot memory when model.json has one (a plain attribute: not learned)."""
        from d2dprompt.methods.d2dprompt.memory import split_weights

        prompts, memory = split_weights(weights)
        model.prompts.load_state_dict(prompts)
        if not self.scores_together(record) and set(memory) != set(record.get("memory", {})):
            raise KeyError(f"the memory's categories {sorted(memory)} are not model.json's {sorted(record.get('memory', {}))}")
        model.__dict__["memory"] = memory
        return model.eval()

    def encode(self, model: D2DSegmenter, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """Latents exactly as the latents stage stores them (its dtype), so an image scores as evaluate scored it."""
        from d2dprompt.core.data.latent_store import LATENT_DTYPE
        from d2dprompt.core.models import encode

        return encode(model.sd, images, device).to(LATENT_DTYPE)

    def graph_inputs(self, model: D2DSegmenter, pixels: torch.Tensor) -> torch.Tensor:
        from d2dprompt.methods.graph import latents_of

        return latents_of(model.sd.vae, pixels)

    def export_graph(self, model: D2DSegmenter, record: dict, scoring: Scoring, category: str | None):
        """VAE encoder + the UNet up to the last captured layer + the map head, the prompt states baked in (graph.py)."""
        from d2dprompt.methods.d2dprompt.graph import PromptGraph

        if self.scores_together(record):
            return super().export_graph(model, record, scoring, category)  # refused there, in one line
        return PromptGraph(model, record, scoring, category, self.input_size(record))

    def export_tolerance(self, record: dict) -> float:
        """A few-shot run's fused maps are z-scores of feature distances: a latent rounding to the neighbouring fp16
        value moves them by up to 1.1e-3 on the sample (maps within +-3.7); prompt maps alone are shares in [0, 1]."""
        fused = record.get("memory") and record.get("fewshot", {}).get("fusion", 0) > 0
        return 1e-2 if fused else super().export_tolerance(record)

    def scorer(self, model: D2DSegmenter, record: dict, scoring: Scoring, device: torch.device):
        from d2dprompt.methods.d2dprompt.model import latent_maps

        noise_seed = record["model"]["noise_seed"]
        memory = getattr(model, "memory", None)
        if not memory and not self.scores_together(record):
            return lambda latents, categories: latent_maps(model, latents, noise_seed, scoring, device)
        return self.memory_scorer(model, record, memory, scoring, device)

    def memory_scorer(self, model: D2DSegmenter, record: dict, memory: dict, scoring: Scoring, device: torch.device):
        """Few-shot scoring: each row's prompt map fused with its category's memory map (memory.py), then finished as
        every map is. The memory moves to `device` once, here. Mutual scoring gets one category's images at once."""
        import torch

        from d2dprompt.core.eval.maps import finish_maps
        from d2dprompt.core.models import autocast
        from d2dprompt.methods.base import category_index
        from d2dprompt.methods.d2dprompt.memory import category_maps, mutual_maps
        from d2dprompt.methods.d2dprompt.model import fixed_noise

        placed = {c: {layer: t.to(device) for layer, t in layers.items()} for c, layers in memory.items()}
        noise_seed, weight = record["model"]["noise_seed"], record["fewshot"]["fusion"]

        def score(latents: torch.Tensor, categories: list) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = [record["categories"][category_index(record, c, self.name)] for c in categories]
            batch = latents.float().to(device)
            with torch.no_grad(), autocast(device, scoring.precision):
                if self.scores_together(record):  # evaluate gives one category's images at once
                    fused = mutual_maps(model, record["memory"][chosen[0]], weight, record["fewshot"]["interval"], batch, noise_seed, scoring.batch_size, device)
                else:
                    noise = fixed_noise(batch.shape[0], tuple(batch.shape[1:]), noise_seed).to(device)
                    fused = category_maps(model, placed, record["memory"], weight, batch, noise, chosen)
            maps, scores = finish_maps(fused, scoring.map_size, scoring.sigma, scoring.score, scoring.top_percent, scoring.image_top_percent)
            return maps.cpu(), scores.cpu()

        return score
