"""DRAEM (Zavrtanik et al., ICCV 2021): a reconstructive encoder-decoder that repaints an image as normal, and a
discriminative U-Net that reads the image beside its repainting and segments what changed. Pure torch, no I/O.

Trained from scratch on normal images with synthetic anomalies (the caller draws them with synth.py):
loss = L2(reconstruction, clean) + (1 - SSIM)(reconstruction, clean) + focal(softmax(mask logits), mask).
Anomaly map = softmax channel 1; image score = max of its 21x21 mean filter, as the authors' test code.
The paper's settings: 256 px, reconstructive base width 128, discriminative 64, Adam 1e-4, batch 8,
700 epochs with the learning rate x0.2 at 80 % and 90 % of them; widths here are arguments so a tiny
model trains in minutes on a CPU. Inputs are RGB in [0, 1] with sides divisible by 32 (five poolings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from d2dprompt.core.losses import focal_loss

PAPER = {"image_size": 256, "recon_width": 128, "disc_width": 64, "lr": 1e-4, "batch_size": 8, "epochs": 700}
SCORE_KERNEL = 21  # the authors' mean filter before the image-level max


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _double(cin: int, mid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv(cin, mid), *_conv(mid, cout))


def _up(cin: int, cout: int) -> nn.Sequential:
    """Bilinear x2 then a conv, as the authors upsample (no transposed convolutions)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv(cin, cout))


class ReconstructiveSubNetwork(nn.Module):
    """Encoder (widths w, 2w, 4w, 8w, 8w with four poolings) and a decoder without skips: it must repaint."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128):
        super().__init__()
        w = base_width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList(_double(cin, cout, cout) for cin, cout in zip([in_channels] + widths[:-1], widths))
        self.ups = nn.ModuleList([_up(8 * w, 8 * w), _up(4 * w, 4 * w), _up(2 * w, 2 * w), _up(w, w)])
        self.blocks = nn.ModuleList([_double(8 * w, 8 * w, 4 * w), _double(4 * w, 4 * w, 2 * w), _double(2 * w, 2 * w, w), _double(w, w, w)])
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if index else x)
        for up, block in zip(self.ups, self.blocks):
            x = block(up(x))
        return self.out(x)


class DiscriminativeSubNetwork(nn.Module):
    """U-Net over concat(reconstruction, image): encoder widths w..8w (six blocks), skips into every decoder block."""

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64):
        super().__init__()
        w = base_width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList(_double(cin, cout, cout) for cin, cout in zip([in_channels] + widths[:-1], widths))
        outs = [8 * w, 4 * w, 2 * w, w, w]  # decoder widths, from the bottleneck up
        self.ups = nn.ModuleList(_up(cin, cout) for cin, cout in zip([8 * w] + outs[:-1], outs))
        skips = widths[-2::-1]  # 8w, 8w, 4w, 2w, w
        self.blocks = nn.ModuleList(_double(cout + skip, cout, cout) for cout, skip in zip(outs, skips))
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for index, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if index else x)
            features.append(x)
        for up, block, skip in zip(self.ups, self.blocks, features[-2::-1]):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.out(x)


class Draem(nn.Module):
    def __init__(self, recon_width: int = 128, disc_width: int = 64):
        super().__init__()
        self.reconstructive = ReconstructiveSubNetwork(3, 3, recon_width)
        self.discriminative = DiscriminativeSubNetwork(6, 2, disc_width)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1], H and W divisible by 32."""
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"draem: image sides must be multiples of 32 (five poolings), got {tuple(images.shape[-2:])}")
        reconstruction = self.reconstructive(images)
        return {"reconstruction": reconstruction, "mask_logits": self.discriminative(torch.cat([reconstruction, images], dim=1))}


def draem_loss(out: dict[str, torch.Tensor], clean: torch.Tensor, masks: torch.Tensor, focal_gamma: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L2 + (1 - SSIM) of the reconstruction vs the clean image + focal of the predicted mask, weighted 1:1:1 as the
    authors' train_DRAEM.py (anomalib weighs SSIM x2). SSIM: pytorch-msssim, 11-px Gaussian window sigma 1.5 as theirs."""
    reconstruction = out["reconstruction"].float()
    l2 = F.mse_loss(reconstruction, clean)
    ssim_term = 1 - ssim(reconstruction, clean, data_range=1.0, win_size=11)
    focal = focal_loss(out["mask_logits"].float().softmax(1), (masks > 0.5).float(), focal_gamma)
    total = l2 + ssim_term + focal
    return total, {"l2": float(l2.detach()), "ssim": float(ssim_term.detach()), "focal": float(focal.detach())}


def anomaly_map(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, H, W): the probability of the anomalous class."""
    return out["mask_logits"].float().softmax(1)[:, 1]


def image_score(maps: torch.Tensor, kernel: int = SCORE_KERNEL) -> torch.Tensor:
    """(B,) the max of the map's `kernel`-wide mean filter (stride 1, zero padding kernel // 2, as the authors)."""
    return F.avg_pool2d(maps[:, None], kernel, stride=1, padding=kernel // 2).flatten(1).amax(1)


def step_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """The paper's schedule: the learning rate x0.2 at 80 % and 90 % of the epochs (stepped once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(epochs * 0.8), int(epochs * 0.9)], gamma=0.2)


@torch.no_grad()
def score_images(model: Draem, images: torch.Tensor, scoring, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One category's DRAEM on images in [0, 1] -> (maps at scoring.map_size, the authors' image scores), on the CPU.

    The image score is read off the network's own map (max of its mean-filtered softmax, as the authors' test code);
    the pixel map gets the same post-processing as every method's."""
    from d2dprompt.core.eval.maps import to_image_size
    from d2dprompt.core.models import autocast

    with autocast(device, scoring.precision):
        out = model(images.to(device))
    amap = anomaly_map(out).float()
    return to_image_size(amap, scoring.map_size, scoring.sigma).cpu(), image_score(amap).float().cpu()
