"""Pixels per latent cell of a model's VAE, known without loading weights or importing torch.

config.py checks `model.image_size` against it when params.yaml is read, before any stage loads a model;
models.py builds the tiny VAE from the same block list, so the number is written once.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY = "tiny"  # model.pretrained naming the embedded model
TINY_VAE_BLOCKS = (16, 32, 32)  # the tiny VAE's block_out_channels: three blocks -> latents at 1/4 of the image side
SD_VAE_FACTOR = 8  # every Stable Diffusion VAE (1.x, 2.x, XL) has four blocks: latents at 1/8 of the image side


def factor_of(block_out_channels) -> int:
    """Each VAE block but the last halves the resolution."""
    return 2 ** (len(block_out_channels) - 1)


def vae_factor(pretrained: str) -> int:
    """`tiny`, a local diffusers folder (its vae/config.json) or a hub id (its cached config, else 8).

    Raises ValueError naming the folder when a local folder has no readable vae/config.json.
    """
    if pretrained == TINY:
        return factor_of(TINY_VAE_BLOCKS)
    local = Path(pretrained)
    if local.exists():
        return _factor_from_config(local / "vae" / "config.json", f"{pretrained}: not a diffusers folder")
    cached = _cached_hub_config(pretrained)
    # not downloaded yet: every published SD VAE has factor 8; the load itself names an unknown id
    return _factor_from_config(Path(cached), f"{cached}: unreadable") if cached else SD_VAE_FACTOR


def _factor_from_config(path: Path, problem: str) -> int:
    try:
        blocks = json.loads(path.read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{problem} (no usable {path.name} in {path.parent}: {type(err).__name__})") from None
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{problem} ({path}: block_out_channels must be a non-empty list)")
    return factor_of(blocks)


def _cached_hub_config(repo_id: str) -> str | None:
    """The hub cache's copy of `<repo_id>/vae/config.json`, or None; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache  # light; imported only for hub ids
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "vae/config.json")
    except ValueError:  # not a valid repo id: the load reports it
        return None
    return found if isinstance(found, str) else None  # None, or a marker for "known to be absent"
