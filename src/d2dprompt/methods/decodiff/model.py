"""DeCo-Diff (Beizaee et al., CVPR 2025): a diffusion model in a frozen VAE's latent space, trained on normal
images only, that repaints an image's latent as normal; where it had to change the image is the anomaly. Pure
torch + diffusers (UNet2DModel, DDIMScheduler), no I/O.

Training (`DecoDiff.loss`): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) d, where the deviation d is Gaussian noise
except on a random share (up to `shuffle_ratio`) of latent patches, where it is a patch of another image of
the batch (the authors' patch shuffling: deviations that look like structure, not noise). The UNet sees x_t
with a random share (up to `mask_ratio`) of its latent patches zeroed, is told the category (one model for
all categories, class-conditioned as the authors' multi-class model) and predicts d (MSE).
Inference (`DecoDiff.repaint`): the image's own latent is taken as x_t at the first of `reverse_steps` DDIM
steps (eta 0, the deviation as epsilon) over the `timesteps`-step schedule: no noise is added, the model
removes what it reads as deviation.
Map (`anomaly_map`, the authors' formulas): pixel term = max over RGB of |decode(repainted) - decode(latent)|
in [-1, 1], clipped to 0.4, x2.5, Gaussian sigma 3 px; latent term = mean over channels of |repainted -
latent|, clipped to 0.2, x5, Gaussian sigma 1 cell, bilinear to the pixel size; map = sqrt(pixel x latent);
image score = the map's max.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2dprompt.core.eval.maps import gaussian_blur  # scipy's gaussian_filter, mode 'reflect'

PATCH_SIZES = (1, 2, 4, 8)  # the authors' latent patch sizes at 256 px, drawn with these probabilities
PATCH_PROBS = (0.4, 0.3, 0.2, 0.1)
PIXEL_CLIP, LATENT_CLIP = 0.4, 0.2  # the authors' clip values; the terms are then scaled to [0, 1]
PIXEL_SIGMA, LATENT_SIGMA = 3.0, 1.0  # the authors' Gaussian sigmas (pixels, latent cells)


def build_unet(latent_channels: int, latent_size: int, channels: list[int], layers_per_block: int, num_classes: int):
    """diffusers' UNet2DModel on latents: attention in the deepest level only, one class embedding per category."""
    from diffusers import UNet2DModel

    levels = len(channels)
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        norm_num_groups=math.gcd(*channels, 32),  # GroupNorm needs a divisor of every width; 32 as DDPM when it divides
        attention_head_dim=channels[-1] // 4 if channels[-1] % 4 == 0 else channels[-1],  # 4 heads when they divide the width
        num_class_embeds=num_classes,
    )


def build_scheduler(timesteps: int, beta_start: float, beta_end: float):
    """The deviation schedule: diffusers' DDIM over `timesteps` steps of linear betas; no clipping (latents are unbounded)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon", timestep_spacing="leading")


def patch_mask(batch: int, side: int, keep: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, side, side) {0, 1}: in row b, round(keep[b] x cells) random `patch`-sized cells are 1, the rest 0."""
    cells = (side // patch) ** 2
    order = torch.rand(batch, cells, generator=generator).argsort(1)
    kept = (order < (keep * cells).long()[:, None]).float()  # a random subset of the wanted size per row
    grid = kept.view(batch, 1, side // patch, side // patch)
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def shuffle_patches(latents: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """The batch's `patch`-sized latent patches, permuted across all images and positions."""
    b, c, h, w = latents.shape
    patches = F.unfold(latents, patch, stride=patch)  # (B, C*p*p, L)
    flat = patches.permute(0, 2, 1).reshape(-1, c * patch * patch)
    flat = flat[torch.randperm(flat.shape[0], generator=generator).to(flat.device)]
    patches = flat.view(b, -1, c * patch * patch).permute(0, 2, 1)
    return F.fold(patches, (h, w), patch, stride=patch)


def patch_size_for(side: int, generator: torch.Generator) -> int:
    """One of PATCH_SIZES (those that tile the latent at least 4 x 4), drawn with the authors' probabilities."""
    sizes = [(s, p) for s, p in zip(PATCH_SIZES, PATCH_PROBS) if side % s == 0 and side // s >= 4]
    probs = torch.tensor([p for _, p in sizes])
    return sizes[int(torch.multinomial(probs / probs.sum(), 1, generator=generator))][0]


class DecoDiff(nn.Module):
    def __init__(self, unet: nn.Module, timesteps: int, beta_start: float, beta_end: float, mask_ratio: float, shuffle_ratio: float):
        super().__init__()
        self.unet = unet
        self.scheduler = build_scheduler(timesteps, beta_start, beta_end)
        self.mask_ratio, self.shuffle_ratio = mask_ratio, shuffle_ratio

    def predict(self, sample: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, t, class_labels=classes).sample

    def loss(self, latents: torch.Tensor, classes: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE of the predicted deviation; all randomness from `generator` (CPU), so a resumed epoch is the same epoch."""
        b, _, side, _ = latents.shape
        device = latents.device
        patch = patch_size_for(side, generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        shuffled_share = torch.rand(b, generator=generator) * self.shuffle_ratio
        gaussian = patch_mask(b, side, 1 - shuffled_share, patch, generator).to(device)
        deviation = gaussian * noise + (1 - gaussian) * shuffle_patches(latents, patch, generator)
        masked_share = torch.rand(b, generator=generator) * self.mask_ratio
        visible = patch_mask(b, side, 1 - masked_share, patch, generator).to(device)
        noisy = self.scheduler.add_noise(latents, deviation, t.to(device))
        predicted = self.predict(noisy * visible, t.to(device), classes)
        mse = F.mse_loss(predicted.float(), deviation)
        return mse, {"mse": float(mse.detach())}

    @torch.no_grad()
    def repaint(self, latents: torch.Tensor, classes: torch.Tensor, reverse_steps: int) -> torch.Tensor:
        """Deterministic DDIM from the image's own latent through `reverse_steps` steps down to t = 0."""
        self.scheduler.set_timesteps(reverse_steps)
        sample = latents
        for t in self.scheduler.timesteps:
            step = torch.full((latents.shape[0],), int(t), device=latents.device)
            sample = self.scheduler.step(self.predict(sample, step, classes).float(), int(t), sample, eta=0.0).prev_sample
        return sample


def anomaly_map(pixels: torch.Tensor, repainted_pixels: torch.Tensor, latents: torch.Tensor, repainted: torch.Tensor) -> torch.Tensor:
    """(B, H, W) in [0, 1]: the geometric mean of the clipped, smoothed pixel and latent discrepancies.

    pixels / repainted_pixels: (B, 3, H, W) VAE decodings in [-1, 1] of the latent and of its repainting;
    latents / repainted: (B, C, h, w).
    """
    pixel = (repainted_pixels.float() - pixels.float()).abs().amax(1).clamp(0, PIXEL_CLIP) / PIXEL_CLIP
    pixel = gaussian_blur(pixel, PIXEL_SIGMA)
    latent = (repainted.float() - latents.float()).abs().mean(1).clamp(0, LATENT_CLIP) / LATENT_CLIP
    latent = gaussian_blur(latent, LATENT_SIGMA)
    latent = F.interpolate(latent[:, None], size=pixel.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (pixel * latent).clamp_min(0).sqrt()


def image_score(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).amax(1)



@torch.no_grad()
def latent_maps(model: DecoDiff, latents: torch.Tensor, classes: torch.Tensor, reverse_steps: int, scoring, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of stored latents -> (maps at scoring.map_size, image scores: the max of its own map), on the CPU.

    Both the latent and its repainting are decoded by the VAE (`model.vae`), so the pixel term compares two decodings
    (the VAE's own reconstruction error cancels), as the authors' evaluation does."""
    from d2dprompt.core.eval.maps import to_image_size
    from d2dprompt.core.models import autocast, decode_with

    latents = latents.float().to(device)
    with autocast(device, scoring.precision):
        repainted = model.repaint(latents, classes.to(device), reverse_steps)
        pixels, repainted_pixels = decode_with(model.vae, latents), decode_with(model.vae, repainted)
    amap = anomaly_map(pixels, repainted_pixels, latents, repainted)
    return to_image_size(amap, scoring.map_size, scoring.sigma).cpu(), image_score(amap).float().cpu()


class RepaintGraph(nn.Module):
    """One category's DeCo-Diff as export.py traces it: pixels in [0, 1] -> (maps, image scores), `latent_maps` with
    the class label a constant and the DDIM loop unrolled (its timesteps are fixed by `reverse_steps`)."""

    def __init__(self, model: DecoDiff, label: int, reverse_steps: int, scoring):
        super().__init__()
        self.model, self.label, self.reverse_steps, self.scoring = model, label, reverse_steps, scoring

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from d2dprompt.methods.graph import latents_of

        latents = latents_of(self.model.vae, pixels)
        classes = torch.full((latents.shape[0],), self.label, dtype=torch.long)
        return latent_maps(self.model, latents, classes, self.reverse_steps, self.scoring, torch.device("cpu"))
