"""AnomalyCLIP (zqhang/AnomalyCLIP, ICLR 2024) on a frozen CLIP: model.py (DPAM, prompts, maps, its authors' loss),
train.py (train@anomalyclip on the same rows as D2D-Prompt, read as pixels). Its block names the backbone; its
prompts, loss switches and training protocol are the shared prompt / loss / train blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from d2dprompt.core.runtime.config import Block, Once
from d2dprompt.core.vae_factor import TINY
from d2dprompt.methods.base import Method, Scoring, TrainJob

if TYPE_CHECKING:
    import torch

    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.anomalyclip.model import AnomalyCLIP


class AnomalyCLIPParams(Block):
    """AnomalyCLIP's backbone; its prompts, loss weights and training protocol are the shared prompt / loss / train blocks."""

    pretrained: str = Field(TINY, min_length=1)  # tiny (embedded, offline) | openai/clip-vit-large-patch14-336 | a local folder
    tiny_seed: int = Field(0, ge=0)  # the tiny CLIP's weights are a pure function of this seed
    image_size: int = Field(112, ge=14)  # 518 for ViT-L/14@336 (AnomalyCLIP); tiny: 8x8 patches of 14 px
    dpam_layers: int = Field(19, ge=0)  # V-V attention on a parallel path in the last N vision blocks (AnomalyCLIP: 19 of 24)
    feature_layers: Annotated[list[Annotated[int, Field(ge=1)]], Once] = Field([24], min_length=1)  # maps from these blocks (1-based; AnomalyCLIP since 2025-04: [24])


class AnomalyCLIPMethod(Method):
    name = "anomalyclip"
    params = AnomalyCLIPParams
    record_blocks = ("anomalyclip", "prompt", "loss", "train")
    reads = "pixels"
    own_image_score = True  # the global feature's abnormal probability, as its test.py

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        from d2dprompt.methods.anomalyclip.train import run

        return run(self, params, job)

    def build(self, params: CoreParams, record: dict) -> AnomalyCLIP:
        from d2dprompt.methods.anomalyclip.model import AnomalyCLIP, load_clip

        a, p = params.anomalyclip, params.prompt
        clip, tokenizer = load_clip(a.pretrained, a.tiny_seed, a.image_size)
        return AnomalyCLIP(clip, tokenizer, p.n_ctx, p.t_n_ctx, p.depth, p.object_word, p.abnormal_word, p.init_std, a.dpam_layers, a.feature_layers)

    def benchmark(self, scale: str, device: torch.device, precision: str, steps: int) -> dict:
        from d2dprompt.methods.anomalyclip.bench import benchmark

        return benchmark(scale, device, precision, steps)

    def load_weights(self, model: AnomalyCLIP, weights: dict[str, torch.Tensor], record: dict) -> AnomalyCLIP:
        model.prompts.load_state_dict(weights)
        return model.eval()

    def input_size(self, record: dict) -> int:
        return record["anomalyclip"]["image_size"]

    def export_graph(self, model: AnomalyCLIP, record: dict, scoring: Scoring, category: str | None):
        """The CLIP vision tower (DPAM, the feature layers) and the map, the text features baked in."""
        from d2dprompt.methods.anomalyclip.model import FixedTextGraph

        return FixedTextGraph(model, scoring)

    def scorer(self, model: AnomalyCLIP, record: dict, scoring: Scoring, device: torch.device):
        from d2dprompt.methods.anomalyclip.model import score_images

        return lambda images, categories: score_images(model, images, scoring, device)
