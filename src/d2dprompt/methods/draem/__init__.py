"""DRAEM (VitjanZ/DRAEM, ICCV 2021): model.py (the reconstructive and discriminative networks, loss, map and score),
train.py (train@draem: one model per category from scratch, anomalies drawn in DataLoader workers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from d2dprompt.core.runtime.config import Block
from d2dprompt.methods.base import Method, Scoring, TrainJob, category_index

if TYPE_CHECKING:
    import torch
    from torch import nn

    from d2dprompt.core.runtime.config import CoreParams


class DraemParams(Block):
    """DRAEM, trained from scratch per category; the paper's settings are in the README (256 px, widths 128 / 64, 700 epochs)."""

    image_size: int = Field(64, ge=16)  # the paper: 256; 64 keeps the embedded default to minutes on 2 CPU cores
    recon_width: int = Field(8, ge=1)  # reconstructive network's base width (the paper: 128)
    disc_width: int = Field(4, ge=1)  # discriminative U-Net's base width (the paper: 64)
    epochs: int = Field(200, ge=1)  # per category (the paper: 700); lr x0.2 at 80 % and 90 % of them
    batch_size: int = Field(8, ge=1)  # the paper's batch
    lr: float = Field(1e-4, gt=0)  # the paper's Adam learning rate
    anomaly_share: float = Field(0.5, ge=0, le=1)  # images given a synthetic anomaly per epoch (the paper: half)
    rotation_share: float = Field(0.3, ge=0, le=1)  # images rotated by U(-90, 90) degrees first (the authors: 30 %); 0 = off
    # DataLoader processes drawing the anomalies beside training (the same bits with any count). 0: at the default 64 px
    # a draw costs 2 ms against a 90 ms step on 2 CPU cores, and workers only compete for them; at 256 px on a GPU a
    # draw costs 34 ms against an 82 ms step of 8 images: set 4 or more there (README, BENCHMARKS.md)
    workers: int = Field(0, ge=0)
    checkpoint_every: int = Field(10, ge=1)  # epochs between checkpoints (and each category's last): a save costs ~15 ms


class DraemMethod(Method):
    name = "draem"
    params = DraemParams
    record_blocks = ("draem", "latents", "train")
    reads = "pixels"
    learns_from = "evaluate"
    own_image_score = True  # the max of its map's 21x21 mean filter, as the authors' test code
    per_category = True

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        from d2dprompt.methods.draem.train import run

        return run(self, params, job)

    def build(self, params: CoreParams, record: dict) -> nn.ModuleDict:
        """One DRAEM per '<dataset>/<category>' of the record (ModuleDict keys may not hold '/' or '.': their index)."""
        from torch import nn

        from d2dprompt.methods.draem.model import Draem

        return nn.ModuleDict({str(i): Draem(params.draem.recon_width, params.draem.disc_width) for i, _ in enumerate(record["categories"])})

    def load_weights(self, model: nn.ModuleDict, weights: dict[str, torch.Tensor], record: dict) -> nn.ModuleDict:
        """model.safetensors keys its tensors '<dataset>/<category>/<name>'; eval mode: BatchNorm's running statistics."""
        for index, name in enumerate(record["categories"]):
            model[str(index)].load_state_dict({k.removeprefix(f"{name}/"): v for k, v in weights.items() if k.startswith(f"{name}/")})
        return model.eval()

    def input_size(self, record: dict) -> int:
        return record["draem"]["image_size"]

    def benchmark(self, scale: str, device: torch.device, precision: str, steps: int) -> dict:
        from d2dprompt.methods.draem.bench import benchmark

        return benchmark(scale, device, precision, steps)

    def scorer(self, model: nn.ModuleDict, record: dict, scoring: Scoring, device: torch.device):
        from d2dprompt.methods.draem.model import score_images

        def score(images: torch.Tensor, categories: list) -> tuple[torch.Tensor, torch.Tensor]:
            index = category_index(record, categories[0], self.name)  # evaluate and predict give one category per batch
            return score_images(model[str(index)], images, scoring, device)

        return score
