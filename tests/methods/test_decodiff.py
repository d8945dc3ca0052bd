"""DeCo-Diff's torch model: the map fusion against the authors' formula, the training corruptions, DDIM
from the image's own latent, and a tiny model trained on the sample repainting normal latents less."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from d2dprompt.core.eval.maps import gaussian_blur
from d2dprompt.methods.decodiff.model import DecoDiff, anomaly_map, build_unet, image_score, patch_mask, shuffle_patches

SAMPLE = Path(__file__).resolve().parents[2] / "sample"  # the git-tracked sample: data/sample appears only after dvc checkout


def reference_map(pixels, repainted_pixels, latents, repainted) -> np.ndarray:
    """The authors' evaluation code for one image, in numpy/scipy (C, H, W arrays)."""
    pixel = np.clip(np.abs(repainted_pixels - pixels).max(0), 0.0, 0.4) * 2.5
    pixel = gaussian_filter(pixel, sigma=3)
    latent = np.clip(np.abs(repainted - latents).mean(0), 0.0, 0.2) * 5
    latent = gaussian_filter(latent, sigma=1)
    latent = F.interpolate(torch.from_numpy(latent)[None, None], size=pixel.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    return np.sqrt(pixel * latent)


def test_constant_discrepancies_give_the_hand_computed_map():
    pixels = torch.zeros(1, 3, 16, 16)
    repainted_pixels = pixels.clone()
    repainted_pixels[:, 1] = 0.2  # max over RGB: 0.2 -> x2.5 = 0.5
    latents = torch.zeros(1, 4, 4, 4)
    repainted = torch.full_like(latents, 0.1)  # mean over channels: 0.1 -> x5 = 0.5
    amap = anomaly_map(pixels, repainted_pixels, latents, repainted)
    assert amap.shape == (1, 16, 16)
    assert torch.allclose(amap, torch.full_like(amap, 0.5), atol=1e-6)  # sqrt(0.5 x 0.5); a constant survives the blur
    saturated = anomaly_map(pixels, repainted_pixels + 5, latents, repainted + 5)  # beyond both clips
    assert torch.allclose(saturated, torch.ones_like(saturated), atol=1e-6)
    assert image_score(amap).item() == pytest.approx(0.5)


def test_the_fusion_equals_the_authors_formula_on_a_local_defect():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    repainted_pixels = pixels + 0.05 * torch.randn(2, 3, 32, 32, generator=gen)
    repainted_pixels[:, :, 8:16, 10:20] += 0.6  # a repainted defect: beyond the 0.4 clip in the middle
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    repainted = latents + 0.02 * torch.randn(2, 4, 8, 8, generator=gen)
    repainted[:, :, 2:4, 2:5] += 0.3
    ours = anomaly_map(pixels, repainted_pixels, latents, repainted)
    for i in range(2):
        expected = reference_map(*(t[i].double().numpy() for t in (pixels, repainted_pixels, latents, repainted)))
        np.testing.assert_allclose(ours[i].numpy(), expected, atol=1e-5)
    assert ours[:, 12, 15].min() > 2 * ours[:, 28, 28].max()  # the defect stands out


@pytest.mark.parametrize("sigma, side", [(3.0, 32), (1.0, 4), (3.0, 5)])  # radius 12 on a 5-wide map reflects twice
def test_the_blur_is_scipys_gaussian_filter(sigma, side):
    maps = torch.rand(2, side, side + 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-10)


def test_masks_keep_the_asked_share_in_patches_and_shuffling_only_moves_patches():
    gen = torch.Generator().manual_seed(0)
    mask = patch_mask(3, 16, torch.tensor([1.0, 0.5, 0.25]), 4, gen)
    assert mask.shape == (3, 1, 16, 16)
    assert mask.mean((1, 2, 3)).tolist() == [1.0, 0.5, 0.25]
    blocks = mask.unfold(2, 4, 4).unfold(3, 4, 4)  # every 4x4 patch is all 0 or all 1
    assert torch.all((blocks.amin((-1, -2)) == blocks.amax((-1, -2))))
    latents = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).view(2, 2, 8, 8)
    shuffled = shuffle_patches(latents, 2, gen)
    assert not torch.equal(shuffled, latents)
    as_patches = lambda x: sorted(map(tuple, F.unfold(x, 2, stride=2).permute(0, 2, 1).reshape(-1, 8).tolist()))  # noqa: E731
    assert as_patches(shuffled) == as_patches(latents)  # the same patches (channels kept together), moved


def tiny_decodiff(classes: int = 1, side: int = 8) -> DecoDiff:
    torch.manual_seed(0)
    return DecoDiff(build_unet(4, side, [16, 32], 1, classes), timesteps=10, beta_start=1e-4, beta_end=0.1, mask_ratio=0.7, shuffle_ratio=0.3)


def test_repaint_runs_ddim_from_the_latent_itself_and_is_deterministic():
    model = tiny_decodiff().eval()
    calls = []
    model.predict = lambda sample, t, classes: calls.append(int(t[0])) or torch.zeros_like(sample)  # no deviation found
    latents = torch.randn(2, 4, 8, 8)
    out = model.repaint(latents, torch.zeros(2, dtype=torch.long), reverse_steps=5)
    assert calls == [8, 6, 4, 2, 0]  # the authors' ddim5 of a 10-step schedule: no noise is added first
    abar = model.scheduler.alphas_cumprod
    assert torch.allclose(out, latents / abar[8].sqrt(), atol=1e-5)  # eps = 0: DDIM only rescales to t = 0


def test_the_loss_has_gradients_and_one_generator_makes_it_repeatable():
    model = tiny_decodiff(classes=2)
    latents, classes = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 0, 1])
    first, _ = model.loss(latents, classes, torch.Generator().manual_seed(3))
    first.backward()
    assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    again, _ = model.loss(latents, classes, torch.Generator().manual_seed(3))
    assert again.item() == first.item()


def sample_latents(category: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normal train, normal test, anomalous test) latents of one sample category with the tiny VAE at 64 px."""
    from d2dprompt.core.data.images import load_rgb, resize_rgb
    from d2dprompt.core.models import build_tiny, encode_with

    vae = build_tiny(0).vae
    root = SAMPLE / category

    def encode(paths: list[Path]) -> torch.Tensor:
        return encode_with(vae, [resize_rgb(load_rgb(p), 64) for p in sorted(paths)], torch.device("cpu"))

    test = root / "test"
    anomalous = [p for d in test.iterdir() if d.name != "good" for p in d.iterdir()]
    return encode(list((root / "train/good").iterdir())), encode(list((test / "good").iterdir())), encode(anomalous)


def test_a_tiny_decodiff_trained_on_the_sample_repaints_normal_latents_less_than_anomalous_ones():
    from sklearn.metrics import roc_auc_score

    train, normal, anomalous = sample_latents("weave")
    model = tiny_decodiff(side=train.shape[-1])
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=2e-3, weight_decay=1e-4)
    classes = torch.zeros(len(train), dtype=torch.long)
    for epoch in range(100):
        loss, _ = model.loss(train, classes, torch.Generator().manual_seed(epoch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    def change(latents: torch.Tensor) -> torch.Tensor:
        """Per image: the mean of the 5 % most changed latent cells (defects are small)."""
        moved = (model.repaint(latents, torch.zeros(len(latents), dtype=torch.long), 5) - latents).abs().mean(1).flatten(1)
        return moved.topk(max(1, moved.shape[1] // 20), dim=1).values.mean(1)

    normal_change, anomalous_change = change(normal), change(anomalous)
    assert normal_change.mean() < anomalous_change.mean(), (normal_change, anomalous_change)
    labels = [0] * len(normal) + [1] * len(anomalous)
    assert roc_auc_score(labels, torch.cat([normal_change, anomalous_change]).numpy()) > 0.75
