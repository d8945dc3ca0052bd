"""What evaluate keeps of a dataset's test images beside its metrics: two safetensors files per (method, dataset).

    stages/evaluate/<method>/<dataset>/replicas.safetensors   what the compare stage reads (no map at all)
      replicas.<c>.<metric> (R,) float64   category c's bootstrap replicas (c: its index in "exact"'s order)
      aupimo (N,) float64, labels (N,) uint8   each test image's AUPIMO (nan for normal ones), its label
      metadata "index": JSON {"rows", "categories" (per row), "exact": {category: {metric: value | null}},
        "notes": why AUPIMO is n/a where it is, "settings": the evaluate params the replicas were drawn with}

    stages/evaluate/<method>/<dataset>/maps.safetensors   the maps, to look at or analyse further
      maps (N, S, S) float16   the post-processed anomaly maps (evaluate.map_size, sigma), rounded to half precision:
        half the bytes of the float32 maps the metrics were computed from (450 -> 225 MB per method on MVTec AD at
        256 px); the exact values are what evaluate recomputes, bit for bit, from the same inputs
      masks (N, S, ceil(S/8)) uint8   the ground truth, bit-packed along rows (empty for the anomalous images of a
        category without masks, listed in the index's "without_masks")
      scores (N,) float32, labels (N,) uint8
      metadata "index": JSON {"rows": the images' paths in row order, "categories": the same order, "without_masks"
      when a category has no pixel truth}; one key, since
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
    """One method's scored test rows, its maps rounded to float16."""

    image_paths: list[str]
    categories: list[str]
    labels: np.ndarray  # (N,) uint8
    scores: np.ndarray  # (N,) float32
    maps: np.ndarray  # (N, S, S) float16
    masks: np.ndarray  # (N, S, S) bool
    without_masks: tuple[str, ...] = ()  # categories whose anomalous images have no mask: their empty masks are unknown, not normal


def write_evaluated(path: Path, rows: list, labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                    without_masks: set[str] = frozenset()) -> None:
    from safetensors.numpy import save_file

    tensors = {
        "maps": np.ascontiguousarray(maps, dtype=np.float16),
        "masks": np.packbits(np.asarray(masks, dtype=bool), axis=-1),
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.uint8),
    }
    index = {"rows": [r.image_path for r in rows], "categories": [r.category for r in rows]}
    if without_masks:
        index["without_masks"] = sorted(without_masks)
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
        image_paths, categories, without_masks = index["rows"], index["categories"], tuple(index.get("without_masks", ()))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not an evaluate maps file ({type(err).__name__}: {err}); rerun the evaluate stage") from None
    maps = tensors["maps"]
    n = len(image_paths)
    if maps.ndim != 3 or len(maps) != n or len(categories) != n or tensors["scores"].shape != (n,) or tensors["labels"].shape != (n,):
        raise ValueError(f"{path}: {n} rows but maps {maps.shape}, scores {tensors['scores'].shape}, labels {tensors['labels'].shape}; rerun the evaluate stage")
    masks = np.unpackbits(tensors["masks"], axis=-1, count=maps.shape[-1]).astype(bool)
    if masks.shape != maps.shape:
        raise ValueError(f"{path}: masks {masks.shape} do not match maps {maps.shape}; rerun the evaluate stage")
    return Evaluated(image_paths, categories, tensors["labels"], tensors["scores"], maps, masks, without_masks)


REPLICAS_FILE = "replicas.safetensors"


@dataclass(frozen=True)
class Replicated:
    """One method's exact metrics per category, their bootstrap replicas and per-image AUPIMO: all compare needs."""

    image_paths: list[str]
    categories: list[str]  # per row
    labels: np.ndarray  # (N,) uint8
    aupimo: np.ndarray  # (N,) float64, nan for normal images
    exact: dict[str, dict[str, float]]  # {category: {metric: value}}, nan where undefined
    replicas: dict[str, dict[str, np.ndarray]]  # {category: {metric: (R,)}}, {} where a category has one class
    notes: list[str]
    settings: dict  # the params the replicas were drawn with: a compare under others must not pair them


def write_replicated(path: Path, data: Replicated) -> None:
    from safetensors.numpy import save_file

    from d2dprompt.core.runtime.outputs import nan_to_null

    position = {category: i for i, category in enumerate(data.exact)}
    tensors = {f"replicas.{position[c]}.{m}": np.asarray(v, dtype=np.float64) for c, reps in data.replicas.items() for m, v in reps.items()}
    tensors |= {"aupimo": np.asarray(data.aupimo, dtype=np.float64), "labels": np.asarray(data.labels, dtype=np.uint8)}
    index = {"rows": data.image_paths, "categories": data.categories, "exact": nan_to_null(data.exact), "notes": data.notes, "settings": data.settings}
    save_file(tensors, str(path), metadata={"index": json.dumps(index, allow_nan=False)})


def read_replicated(path: Path) -> Replicated:
    """The file's rows and replicas, checked to be consistent; a missing or damaged file stops with one line naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the evaluate stage of this method and dataset first")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            index = json.loads((fh.metadata() or {})["index"])
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        order = list(index["exact"])
        exact = {c: {m: float("nan") if v is None else float(v) for m, v in values.items()} for c, values in index["exact"].items()}
        replicas: dict[str, dict[str, np.ndarray]] = {c: {} for c in order}
        for name, values in tensors.items():
            if name.startswith("replicas."):
                _, c, metric = name.split(".", 2)
                replicas[order[int(c)]][metric] = values
        image_paths, categories, labels, aupimo = index["rows"], index["categories"], tensors["labels"], tensors["aupimo"]
        data = Replicated(image_paths, categories, labels, aupimo, exact, replicas, list(index["notes"]), dict(index["settings"]))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"{path}: not an evaluate replicas file ({type(err).__name__}: {err}); rerun the evaluate stage") from None
    n = len(image_paths)
    if len(categories) != n or labels.shape != (n,) or aupimo.shape != (n,) or set(categories) != set(order):
        raise ValueError(f"{path}: {n} rows but labels {labels.shape}, aupimo {aupimo.shape}, {len(order)} categories; rerun the evaluate stage")
    return data
