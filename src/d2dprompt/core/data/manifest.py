"""The manifest: one CSV row per image of a prepared dataset, and the MVTec-layout scanner that builds it.

`manifest.csv` sits at the root of each prepared dataset; its paths are relative to
that root. Columns: dataset, category, split (train|val|test), label (0 normal,
1 anomalous), defect_type ('good' for normal), image_path, mask_path ('' for normal, and for an anomalous image of a
category that ships no masks: its pixel metrics are n/a, its image metrics computed as usual). Split `val` holds a
dataset's own validation images (`<category>/validation/good/`, as MVTec AD 2 ships them): where a category has
them, the latents stage fits thresholds on them instead of holding out training images.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from d2dprompt.core.runtime.outputs import atomic_file

COLUMNS = ("dataset", "category", "split", "label", "defect_type", "image_path", "mask_path")
SPLITS = ("train", "val", "test")
VALIDATION = "validation"  # <category>/validation/good: the dataset's own validation images (MVTec AD 2)
GOOD = "good"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # what MVTec AD, VisA and phone exports use
MANIFEST_NAME = "manifest.csv"


class LayoutError(ValueError):
    """A folder that is not in MVTec AD layout, or an anomalous image without its mask."""


class ManifestError(ValueError):
    """A manifest file with a bad header or row."""


@dataclass(frozen=True)
class ManifestRow:
    dataset: str
    category: str
    split: str
    label: int
    defect_type: str
    image_path: str
    mask_path: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.label not in (0, 1) or isinstance(self.label, bool):
            raise ValueError(f"label must be 0 or 1, got {self.label!r}")
        if (self.label == 0) != (self.defect_type == GOOD):
            raise ValueError(f"label {self.label} does not match defect_type {self.defect_type!r}")
        if self.label == 0 and self.mask_path:
            raise ValueError("normal images must have no mask_path")
        for name in ("dataset", "category", "defect_type", "image_path"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")


def write_manifest(rows: list[ManifestRow], path: str | Path) -> None:
    """Write `rows` to `path` atomically (temp file in the same folder, then rename)."""
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([getattr(row, name) for name in COLUMNS])


def read_manifest(path: str | Path) -> list[ManifestRow]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ManifestError(f"{path}: header must be {','.join(COLUMNS)}, got {','.join(header or [])!r}")
        rows = []
        for record in reader:
            if not record:
                continue
            try:
                if len(record) != len(COLUMNS):
                    raise ValueError(f"expected {len(COLUMNS)} fields, got {len(record)}")
                values = dict(zip(COLUMNS, record))
                if values["label"] not in ("0", "1"):
                    raise ValueError(f"label must be 0 or 1, got {values['label']!r}")
                rows.append(ManifestRow(**{**values, "label": int(values["label"])}))
            except ValueError as err:
                raise ManifestError(f"{path}:{reader.line_num}: {err}") from None
    return rows


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _scan_category(root: Path, cat_dir: Path, dataset: str) -> list[ManifestRow]:
    category = cat_dir.name
    train_good, test_dir = cat_dir / "train" / GOOD, cat_dir / "test"
    if not train_good.is_dir() and (cat_dir / "train" / "ok").is_dir():
        raise LayoutError(f"{cat_dir / 'train' / 'ok'}: BTAD's ok/ko naming; MVTec layout names normal images good/: rename "
                          "train/ok and test/ok to good (test/ko and ground_truth/ko may stay), or list btad in download.archives")
    if not train_good.is_dir() or not images_in(train_good):
        raise LayoutError(f"{train_good}: missing or empty; MVTec layout needs <category>/train/good/*.png")
    extra = [d.name for d in subdirs(cat_dir / "train") if d.name != GOOD]
    if extra:
        raise LayoutError(f"{cat_dir / 'train'}: only good/ is allowed in train, found {', '.join(extra)}")
    if test_dir.is_dir() and not subdirs(test_dir):  # absent is a folder of normal images only: train, fit thresholds, predict
        raise LayoutError(f"{test_dir}: empty; MVTec layout needs <category>/test/<defect>/ (or no test/ at all for normal images only)")

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    # masks are all or nothing per category: without ground_truth/ the defects are known per image only (pixel
    # metrics n/a); with it, a missing mask is a mistake to report, not a hole to score as an empty mask
    has_masks = (cat_dir / "ground_truth").is_dir()
    rows = [ManifestRow(dataset, category, "train", 0, GOOD, rel(p), "") for p in images_in(train_good)]
    if (cat_dir / VALIDATION).is_dir():
        val_good = cat_dir / VALIDATION / GOOD
        extra = [d.name for d in subdirs(cat_dir / VALIDATION) if d.name != GOOD]
        if extra or not val_good.is_dir() or not images_in(val_good):
            raise LayoutError(f"{cat_dir / VALIDATION}: the validation split holds normal images only, in {VALIDATION}/good/"
                              + (f" (found {', '.join(extra)})" if extra else ""))
        rows += [ManifestRow(dataset, category, "val", 0, GOOD, rel(p), "") for p in images_in(val_good)]
    for defect_dir in subdirs(test_dir) if test_dir.is_dir() else []:
        defect = defect_dir.name
        stems: dict[str, Path] = {}
        for image in images_in(defect_dir):
            if defect != GOOD and image.stem in stems:  # 000.png and 000.jpg would both pair with 000_mask.png
                raise LayoutError(f"{stems[image.stem]} and {image}: two images named {image.stem!r} share one mask "
                                  f"({image.stem}_mask.png); rename or remove one")
            stems[image.stem] = image
            if defect == GOOD:
                rows.append(ManifestRow(dataset, category, "test", 0, GOOD, rel(image), ""))
                continue
            if not has_masks:
                rows.append(ManifestRow(dataset, category, "test", 1, defect, rel(image), ""))
                continue
            mask = cat_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file() and (cat_dir / "ground_truth" / defect / f"{image.stem}.png").is_file():
                mask = cat_dir / "ground_truth" / defect / f"{image.stem}.png"  # anomalib's VisA split names masks after the image
            if not mask.is_file():
                raise LayoutError(f"{image}: anomalous image has no mask (expected {mask}, or {image.stem}.png beside it); "
                                  f"a category without {cat_dir.name}/ground_truth/ is scored at image level only")
            rows.append(ManifestRow(dataset, category, "test", 1, defect, rel(image), rel(mask)))
    return rows


def scan_mvtec_layout(root: str | Path, dataset: str, categories: list[str] | None = None) -> list[ManifestRow]:
    """Validate `root` as MVTec AD layout and list its images, sorted by category, split, defect, path.

    Layout: <cat>/train/good/*, <cat>/test/<defect>/*, <cat>/ground_truth/<defect>/<stem>_mask.png (or <stem>.png, as
    anomalib's VisA split names them), and optionally <cat>/validation/good/* (split val). A category without
    ground_truth/ has no pixel truth: its anomalous rows get mask_path ''. One without test/ holds normal training
    images only (anomalib's Folder dataset takes both).
    `categories` (None or empty = all) restricts the scan; an unknown name is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: dataset folder not found")
    if _is_category(root):
        raise LayoutError(f"{root}: this is one category folder; point at its parent (layout: <root>/<category>/train/good)")
    found = {d.name: d for d in subdirs(root) if _is_category(d)}
    if not found:
        raise LayoutError(f"{root}: not MVTec layout, no <category>/train/good or <category>/test folders inside")
    wanted = list(categories) if categories else sorted(found)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise LayoutError(f"{root}: no category {', '.join(missing)} (found: {', '.join(sorted(found))})")
    rows = [row for cat in sorted(set(wanted)) for row in _scan_category(root, found[cat], dataset)]
    return sorted(rows, key=lambda r: (r.category, r.split, r.defect_type, r.image_path))


def manifest_summary(rows: list[ManifestRow]) -> str:
    """'3 categories (a, b, c), train 48, test 51 (15 good, 36 anomalous)': one line for logs (', val N' after
    train when the dataset has its own validation images)."""
    categories = sorted({r.category for r in rows})
    train = sum(r.split == "train" for r in rows)
    val = sum(r.split == "val" for r in rows)
    test = [r for r in rows if r.split == "test"]
    anomalous = sum(r.label for r in test)
    unmasked = sorted({r.category for r in test if r.label and not r.mask_path})
    return (
        f"{len(categories)} {'category' if len(categories) == 1 else 'categories'} ({', '.join(categories)}), "
        f"train {train}{f', val {val}' if val else ''}, test {len(test)} ({len(test) - anomalous} good, {anomalous} anomalous)"
        + (f"; no masks in {', '.join(unmasked)}: image-level metrics only there" if unmasked else "")
    )

