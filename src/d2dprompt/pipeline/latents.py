"""python -m d2dprompt.pipeline.latents [--params params.yaml] [--downloads stages/download] [--out stages/latents]

Encodes every prepared image with the frozen VAE (latent-distribution mean x the VAE's scaling factor)
and, for each normal training image, `latents.synthetic_per_image` DRAEM-style synthetic anomalies
(Perlin mask, anomaly-source texture blended with DRAEM's beta in [beta_min, beta_max] weighing the
image, redrawn until visible, seeded). Per dataset it
writes `latents.safetensors` (latents fp16, masks fp16 at latent size as defect fraction per cell,
labels, and bit-packed image-size masks of the validation rows) and `index.csv`, one row per latent.
A seeded `latents.val_fraction` of each category's normal training images (with their synthetic
anomalies) becomes split `val`: held out from training, used to fit thresholds. A category whose dataset ships
its own validation images (manifest split `val`, e.g. MVTec AD 2's validation/good) uses those, with their
synthetic anomalies, and holds out none of its training images.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer

from d2dprompt.core.runtime.config import LatentsParams, ParamsError
from d2dprompt.params import load_params
from d2dprompt.core.runtime.cli import app_for
from d2dprompt.core.data.images import ImageError
from d2dprompt.core.data.manifest import ManifestRow, read_manifest
from d2dprompt.core.runtime.outputs import atomic_dir

if TYPE_CHECKING:  # torch and the models load when a command runs, not for --help
    import torch

    from d2dprompt.core.data.latent_store import LatentRow
    from d2dprompt.core.models import FrozenSD


def mask_to_latent(masks: list[np.ndarray], latent_hw: tuple[int, int]) -> torch.Tensor:
    """bool HxW masks -> (B, h, w) fraction of defective pixels per latent cell."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.stack(masks)).float()[:, None]
    return F.adaptive_avg_pool2d(m, latent_hw)[:, 0]


def validation_images(rows: list[ManifestRow], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of each category's normal training images, held out from training; none of a category
    whose dataset ships its own validation images (manifest split `val`: they are the validation split).

    They and their synthetic anomalies form the validation split on which thresholds are fitted:
    never the test split, whose numbers would be inflated by it.
    """
    if not 0 <= fraction < 1:
        raise ParamsError(f"latents.val_fraction={fraction}: must lie in [0, 1)")
    held_out: set[str] = set()
    own = {r.category for r in rows if r.split == "val"}  # the dataset ships validation images: nothing held out
    for category in sorted({r.category for r in rows} - own):
        normal = sorted(r.image_path for r in rows if r.category == category and r.split == "train" and r.label == 0)
        count = int(round(fraction * len(normal)))
        if fraction and len(normal) > 1:
            count = min(max(count, 1), len(normal) - 1)  # keep at least one image on each side
        pick = np.random.default_rng([seed, zlib.crc32(category.encode())]).permutation(len(normal))[:count]
        held_out.update(normal[i] for i in pick)
    return held_out


def encode_dataset(
    sd: FrozenSD,
    root: Path,
    rows: list[ManifestRow],
    image_size: int,
    params: LatentsParams,
    device: torch.device,
    desc: str,
) -> tuple[dict[str, torch.Tensor], list[LatentRow]]:
    import torch
    from tqdm import tqdm

    from d2dprompt.core.data.latent_store import LATENT_DTYPE, SYNTHETIC_MARK, LatentRow
    from d2dprompt.core.models import encode
    from d2dprompt.core.data.row_images import load_textures, real_image, synthetic_variant

    textures = load_textures(params.texture_dir)
    latent_hw = (image_size // sd.vae_scale, image_size // sd.vae_scale)
    held_out = validation_images(rows, params.val_fraction, params.seed)
    latents, masks, labels, index, val_masks = [], [], [], [], []
    pending: list[tuple[np.ndarray, np.ndarray, LatentRow]] = []

    def flush() -> None:
        if pending:
            val_masks.extend(np.packbits(p[1], axis=-1) for p in pending if p[2].split == "val")
            latents.append(encode(sd, [p[0] for p in pending], device).to(LATENT_DTYPE).contiguous())
            masks.append(mask_to_latent([p[1] for p in pending], latent_hw).half().contiguous())
            labels.extend(p[2].label for p in pending)
            index.extend(p[2] for p in pending)
            pending.clear()

    for row in tqdm(rows, desc=desc, unit="img"):
        image, mask = real_image(root, row.image_path, row.mask_path, row.label, image_size)
        split = "val" if row.image_path in held_out else row.split
        base = LatentRow(row.image_path, "real", row.category, split, row.label, row.defect_type, row.image_path, row.mask_path)
        pending.append((image, mask, base))
        if row.split in ("train", "val") and row.label == 0:  # validation images get their synthetic anomalies too
            for k in range(params.synthetic_per_image):
                syn, syn_mask = synthetic_variant(image, row.image_path, k, params, textures)
                label = int(syn_mask.any())  # no visible defect could be drawn: a normal row, not a mislabelled one
                kind = "synthetic" if label else "good"
                pending.append((syn, syn_mask, LatentRow(f"{row.image_path}{SYNTHETIC_MARK}{k}", "synthetic", row.category, split, label, kind, row.image_path, "")))
        if len(pending) >= params.batch_size:
            flush()
    flush()
    tensors = {
        "latents": torch.cat(latents).contiguous(),
        "masks": torch.cat(masks),
        "labels": torch.tensor(labels, dtype=torch.uint8),
    }
    if val_masks:  # image-size masks of the validation rows, bit-packed along the width
        tensors["val_masks"] = torch.from_numpy(np.stack(val_masks))
    return tensors, index


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    downloads: Path = typer.Option(Path("stages/download"), help="download stage output"),
    out: Path = typer.Option(Path("stages/latents"), help="where to write one folder per dataset"),
) -> None:
    from safetensors.torch import save_file

    from d2dprompt.core.data.latent_store import write_index
    from d2dprompt.core.models import load_frozen, pick_device

    try:
        cfg = load_params(params)
        device = pick_device(cfg.model.device)
        sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed).to(device)  # image_size fits its VAE: config.py checked
        with atomic_dir(out) as tmp:
            for name in cfg.download.datasets:
                root = downloads / name
                rows = read_manifest(root / "manifest.csv")
                tensors, index = encode_dataset(sd, root, rows, cfg.model.image_size, cfg.latents, device, f"latents {name}")
                (tmp / name).mkdir()
                save_file(tensors, tmp / name / "latents.safetensors")
                write_index(index, tmp / name / "index.csv")
                n_syn = sum(r.source == "synthetic" for r in index)
                typer.echo(f"{name}: {len(index) - n_syn} images + {n_syn} synthetic anomalies -> {tuple(tensors['latents'].shape)}")
    except (ParamsError, ImageError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app_for(main, __doc__)()
