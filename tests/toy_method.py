"""A method written outside the package, as README "Add a method" walks through: one class and one `register` line.

`toy` learns the mean VAE latent of the normal training images of `evaluate.datasets`; a cell's anomaly is
1 - exp(-distance to that mean / toy.scale), in [0, 1]; the image score is the map's maximum. Importing this module
registers it, so `D2D_METHODS=tests.toy_method` puts it behind every stage CLI.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from d2dprompt.core.data.latent_store import LATENT_DTYPE, is_normal_training, read_latents
from d2dprompt.core.runtime.config import Block
from d2dprompt.core.training import write_trained
from d2dprompt.methods import registry
from d2dprompt.methods.base import Method, Scoring, TrainJob, config_record


class ToyParams(Block):
    scale: float = Field(1.0, gt=0)  # the distance at which a cell is 63 % anomalous


class ToyModel(nn.Module):
    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.scale = scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        distance = (latents.float() - self.mean[:, None, None]).square().mean(1).sqrt()
        return 1 - torch.exp(-distance / self.scale)


class ToyMethod(Method):
    name = "toy"
    params = ToyParams
    record_blocks = ("model", "toy")
    reads = "latents"
    learns_from = "evaluate"
    own_image_score = True

    def train(self, params, job: TrainJob) -> list[dict[str, float]]:
        latents = []
        for name in params.evaluate.datasets:
            tensors, rows = read_latents(job.latents / name)
            latents += [tensors["latents"][i].float() for i, row in enumerate(rows) if is_normal_training(row)]
        stacked = torch.stack(latents)
        mean = stacked.mean(dim=(0, 2, 3))
        history = [{"epoch": 1, "spread": float((stacked - mean[:, None, None]).square().mean())}]
        write_trained(job.out, {"mean": mean}, config_record(self, params, latent_channels=int(mean.numel())), history)
        job.echo(f"toy: mean of {len(latents)} normal latents")
        return history

    def build(self, params, record: dict) -> ToyModel:
        from d2dprompt.core.models import load_vae

        model = ToyModel(record["latent_channels"], params.toy.scale)
        model.__dict__["vae"] = load_vae(params.model.pretrained, params.model.tiny_seed)  # encodes predict's images
        return model

    def load_weights(self, model: ToyModel, weights: dict[str, torch.Tensor], record: dict) -> ToyModel:
        model.mean.copy_(weights["mean"])
        return model.eval()

    def encode(self, model: ToyModel, images, device: torch.device) -> torch.Tensor:
        from d2dprompt.core.models import encode_with

        return encode_with(model.vae, images, device).to(LATENT_DTYPE)

    def scorer(self, model: ToyModel, record: dict, scoring: Scoring, device: torch.device):
        from d2dprompt.core.eval.maps import to_image_size

        @torch.no_grad()
        def score(latents: torch.Tensor, categories: list) -> tuple[torch.Tensor, torch.Tensor]:
            amap = model(latents.to(device))
            return to_image_size(amap, scoring.map_size, scoring.sigma).cpu(), amap.flatten(1).amax(1).cpu()

        return score


registry.register(ToyMethod())
