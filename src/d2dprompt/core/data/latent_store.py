"""The latents stage's on-disk format: `latents.safetensors` + `index.csv`, one row per latent."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

SYNTHETIC_MARK = "#syn"  # a synthetic anomaly's key: its source image's path, this mark, its number k
LATENT_DTYPE = torch.float16  # halves the stage's disk size; evaluate and predict read latents at this precision
INDEX_FIELDS = ("key", "source", "category", "split", "label", "defect_type", "image_path", "mask_path")


@dataclass(frozen=True)
class LatentRow:
    key: str  # unique per latent: the image path, plus '#syn<k>' for synthetic anomalies
    source: str  # real | synthetic
    category: str
    split: str
    label: int
    defect_type: str
    image_path: str
    mask_path: str


def write_index(rows: list[LatentRow], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_index(folder: str | Path) -> list[LatentRow]:
    """One dataset's index.csv: the rows (and splits) every method reads, whether it uses latents or pixels."""
    index_path = Path(folder) / "index.csv"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: missing; run the latents stage first")
    with index_path.open(newline="") as fh:
        return [LatentRow(**{**r, "label": int(r["label"])}) for r in csv.DictReader(fh)]


def category_key(dataset: str, category: str) -> str:
    """'<dataset>/<category>': how a category is named across datasets (model.json's categories, MLflow, --category)."""
    return f"{dataset}/{category}"


def is_normal_training(row: LatentRow) -> bool:
    """A real normal image of the training split (not validation, not a synthetic anomaly): what the methods trained
    from scratch on the data they are tested on (DRAEM, DeCo-Diff) learn from."""
    return row.split == "train" and row.source == "real" and row.label == 0


def is_normal_validation(row: LatentRow) -> bool:
    """A real normal image of the validation split: what statistics of normal maps are fitted on, by the rule that
    picks normal training rows (a synthetic row is never one, whatever its label)."""
    return row.split == "val" and row.source == "real" and row.label == 0


def supervised(rows: list[LatentRow], supervision: str) -> list[int]:
    """Indices of the rows a prompt method trains on: `synthetic` = the training split (normal images and their
    synthetic anomalies), `annotated` = the real images of the test split (the zero-shot protocol's auxiliary data)."""
    if supervision == "synthetic":
        return [i for i, r in enumerate(rows) if r.split == "train"]
    keep = [i for i, r in enumerate(rows) if r.split == "test" and r.source == "real"]
    unmasked = [rows[i].image_path for i in keep if rows[i].label and not rows[i].mask_path]
    if unmasked:  # an empty mask would teach "this defect is normal"
        raise ValueError(f"{unmasked[0]}: train.supervision=annotated learns from pixel masks, and {len(unmasked)} anomalous "
                         "images of this dataset have none (a category without ground_truth/)")
    return keep


def read_latents(folder: str | Path) -> tuple[dict[str, torch.Tensor], list[LatentRow]]:
    """Load one dataset's latents stage output."""
    folder = Path(folder)
    tensor_path = folder / "latents.safetensors"
    rows = read_index(folder)
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path}: missing; run the latents stage first")
    tensors = load_file(tensor_path)
    if tensors["latents"].shape[0] != len(rows):
        raise ValueError(f"{folder}: index.csv and latents.safetensors disagree on the number of rows")
    return tensors, rows


def training_set(latents_root: Path, datasets: list[str], supervision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(latents, latent-size masks, labels, keys) concatenated over `datasets`; `supervision` is synthetic | annotated."""
    parts = []
    for name in datasets:
        tensors, rows = read_latents(latents_root / name)
        keep = supervised(rows, supervision)
        if not keep:
            raise ValueError(f"{latents_root / name}: no {supervision} training rows")
        idx = torch.tensor(keep)
        parts.append((tensors["latents"][idx], tensors["masks"][idx], tensors["labels"][idx], [f"{name}/{rows[i].key}" for i in keep]))
    latents = torch.cat([p[0] for p in parts]).float()
    masks = torch.cat([p[1] for p in parts]).float()
    labels = torch.cat([p[2] for p in parts]).float()
    keys = [k for p in parts for k in p[3]]
    return latents, masks, labels, keys
