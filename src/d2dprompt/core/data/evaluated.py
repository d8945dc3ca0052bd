"""The test maps evaluate scored, kept for the compare stage: one safetensors file per (method, dataset).

    stages/evaluate/<method>/<dataset>/maps.safetensors
      maps (N, S, S) float32   the post-processed anomaly maps the metrics read (evaluate.map_size, sigma)
      masks (N, S, ceil(S/8)) uint8   the ground truth, bit-packed along rows
      scores (N,) float32, labels (N,) uint8
      metadata "index": JSON {"rows": the images' paths in row order, "categories": the same order}; one key, since
      safetensors writes its metadata map in a random order per process and two keys would make the file's bytes
      (and dvc.lock) differ between identical runs

Safetensors, never pickle: a file a user could place is only ever parsed as tensors and JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAPS_FILE = "maps.safetensors"


@dataclass(frozen=True)
class Evaluated:
    """One method's scored test rows: what its metrics were computed from."""

    image_paths: list[str]
    categories: list[str]
    labels: np.ndarray  # (N,) uint8
    scores: np.ndarray  # (N,) float32
    maps: np.ndarray  # (N, S, S) float32
    masks: np.ndarray  # (N, S, S) bool


def write_evaluated(path: Path, rows: list, labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> None:
    from safetensors.numpy import save_file

    tensors = {
        "maps": np.ascontiguousarray(maps, dtype=np.float32),
        "masks": np.packbits(np.asarray(masks, dtype=bool), axis=-1),
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.uint8),
    }
    index = {"rows": [r.image_path for r in rows], "categories": [r.category for r in rows]}
    save_file(tensors, str(path), metadata={"index": json.dumps(index)})


def read_evaluated(path: Path) -> Evaluated:
    """The file's rows, checked to be consistent; a missing or damaged file stops with one line naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the evaluate stage of this method and dataset first")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in ("maps", "masks", "scores", "labels")}
        index = json.loads(metadata["index"])
        image_paths, categories = index["rows"], index["categories"]
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not an evaluate maps file ({type(err).__name__}: {err}); rerun the evaluate stage") from None
    maps = tensors["maps"]
    n = len(image_paths)
    if maps.ndim != 3 or len(maps) != n or len(categories) != n or tensors["scores"].shape != (n,) or tensors["labels"].shape != (n,):
        raise ValueError(f"{path}: {n} rows but maps {maps.shape}, scores {tensors['scores'].shape}, labels {tensors['labels'].shape}; rerun the evaluate stage")
    masks = np.unpackbits(tensors["masks"], axis=-1, count=maps.shape[-1]).astype(bool)
    if masks.shape != maps.shape:
        raise ValueError(f"{path}: masks {masks.shape} do not match maps {maps.shape}; rerun the evaluate stage")
    return Evaluated(image_paths, categories, tensors["labels"], tensors["scores"], maps, masks)
