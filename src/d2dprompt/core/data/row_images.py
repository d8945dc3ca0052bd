"""The pixels behind each row of the latents stage's index: real images and synthetic anomalies. No model.

The latents stage encodes these images; methods that read pixels (AnomalyCLIP) rebuild the very same
rows from the index, so every method trains and fits thresholds on the same images, masks and splits.
A synthetic anomaly is a pure function of (latents.seed, the base image's path, k) and the base image at
`model.image_size`, so it is redrawn identically instead of being stored.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from d2dprompt.core.runtime.config import LatentsParams, ParamsError
from d2dprompt.core.data.images import load_mask, load_rgb, resize_mask, resize_rgb
from d2dprompt.core.data.latent_store import SYNTHETIC_MARK, LatentRow
from d2dprompt.core.data.synth import procedural_texture, synthesize_visible

TEXTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_textures(folder: str | None) -> list[Path]:
    if folder is None:
        return []
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in TEXTURE_SUFFIXES)
    if not paths:
        raise ParamsError(f"latents.texture_dir: no images under {folder}")
    return paths


def synthetic_variant(image: np.ndarray, key: str, k: int, params: LatentsParams, textures: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly k of one normal image; a pure function of (seed, image key, k). An empty mask = no defect."""

    def texture_for(rng: np.random.Generator) -> np.ndarray:
        return load_rgb(textures[rng.integers(len(textures))]) if textures else procedural_texture(image.shape[:2], rng)

    return synthesize_visible(
        image,
        texture_for,
        (params.seed, zlib.crc32(key.encode()), k),
        beta_range=(params.beta_min, params.beta_max),
        scale_max=params.perlin_scale_max,
        threshold=params.perlin_threshold,
        min_change=params.min_change,
    )


def real_image(root: Path, image_path: str, mask_path: str, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A prepared image and its mask, both resized to `size`. The mask is empty for a normal image and for an
    anomalous one without pixel truth (a category without ground_truth/): what scores pixels looks at mask_path."""
    raw = load_rgb(root / image_path)
    mask = load_mask(root / mask_path, raw.shape[:2]) if mask_path else np.zeros(raw.shape[:2], dtype=bool)
    return resize_rgb(raw, size), resize_mask(mask, size)


def row_image(
    root: Path, row: LatentRow, size: int, synth_size: int, params: LatentsParams, textures: list[Path]
) -> tuple[np.ndarray, np.ndarray]:
    """The image and mask of `row` at `size`: real images straight from the file, synthetic anomalies
    drawn at `synth_size` (= model.image_size, where the latents stage drew them) and then resized."""
    if row.source != "synthetic":
        return real_image(root, row.image_path, row.mask_path, row.label, size)
    base, _, k = row.key.rpartition(SYNTHETIC_MARK)
    image, _ = real_image(root, base, "", 0, synth_size)
    syn, mask = synthetic_variant(image, base, int(k), params, textures)
    if int(mask.any()) != row.label:
        raise ValueError(f"{row.key}: the index says label {row.label}, the redrawn anomaly says {int(mask.any())}; "
                         "the latents stage ran with other latents params: rerun it")
    return (syn, mask) if size == synth_size else (resize_rgb(syn, size), resize_mask(mask, size))


def to_unit(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images -> (B, 3, H, W) floats in [0, 1]: what the pixel methods' models read."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


class RowImages:
    """Rows of the latents index as pixels at `size`, loaded per batch (MVTec AD at 518 px would not fit in memory)."""

    def __init__(self, roots: list[Path], rows: list[LatentRow], latents: LatentsParams, synth_size: int, size: int):
        """`latents` and `synth_size` (model.image_size) redraw the synthetic anomalies as the latents stage drew them."""
        self.roots, self.rows, self.latents, self.synth_size, self.size = roots, rows, latents, synth_size, size
        self.textures = load_textures(latents.texture_dir)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images in [0, 1], (B, S, S) masks, (B,) labels."""
        pairs = [row_image(self.roots[i], self.rows[i], self.size, self.synth_size, self.latents, self.textures) for i in idx]
        masks = torch.from_numpy(np.stack([p[1] for p in pairs])).float()
        labels = torch.tensor([self.rows[i].label for i in idx], dtype=torch.float32)
        return to_unit([p[0] for p in pairs]), masks, labels
