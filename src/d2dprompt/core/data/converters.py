"""Publishers' layouts -> MVTec AD layout, for the download stage (BTAD, MPDD, MVTec AD 2; VisA lives in download.py).

Each `convert_*(root, dest, categories)` reads an extracted archive (or a user's folder) at `root` and writes the
MVTec layout under `dest`: `<cat>/train/good/`, `<cat>/test/<defect>/`, `<cat>/ground_truth/<defect>/<stem>_mask.png`
and, for MVTec AD 2, `<cat>/validation/good/`. `move=True` moves files out of `root` (a scratch extraction);
`move=False` copies them (a folder the user owns). It returns notes for the log: what was left out and why. The
download stage then checks every image and mask (`build_dataset`) and writes the manifest. Errors name the file
and what was expected there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from d2dprompt.core.data.images import ImageError
from d2dprompt.core.data.manifest import GOOD, VALIDATION, LayoutError, images_in, subdirs

BTAD_NORMAL, BTAD_ANOMALOUS = "ok", "ko"  # BTAD's label folders
BTAD_DEFECT = "ko"  # BTAD names no defect types: its one anomalous folder keeps its name
AD2_TEST = "test_public"  # the only MVTec AD 2 test set with ground truth
AD2_WITHOUT_TRUTH = ("test_private", "test_private_mixed")  # scored by MVTec's server only: no masks published


def _images(folder: Path) -> list[Path]:
    """manifest.images_in, or none where a publisher's folder is absent (a product without anomalous test images)."""
    return images_in(folder) if folder.is_dir() else []


def dataset_root(folder: Path, is_category: Callable[[Path], bool], what: str) -> Path:
    """The folder holding the categories: `folder` itself or, down a chain of single subfolders (an archive that
    wraps everything, like BTAD's BTech_Dataset_transformed/), the first that does."""
    here = folder
    while True:
        if any(is_category(d) for d in subdirs(here)):
            return here
        inner = subdirs(here)
        if len(inner) != 1:
            raise LayoutError(f"{folder}: not {what}: no category folder inside")
        here = inner[0]


def _categories(root: Path, is_category: Callable[[Path], bool], wanted: list[str]) -> list[Path]:
    found = {d.name: d for d in subdirs(root) if is_category(d)}
    missing = [c for c in wanted if c not in found]
    if missing:
        raise LayoutError(f"{root}: no category {', '.join(missing)} (found: {', '.join(sorted(found))})")
    return [found[c] for c in sorted(wanted or found)]


def _claim(src: Path, target: Path) -> None:
    """Make room for `target`, refusing a second source file that would land on it."""
    if target.exists():
        raise LayoutError(f"{src}: a second image would become {target.name} in {target.parent.name}/ (same name, other suffix)")
    target.parent.mkdir(parents=True, exist_ok=True)


def _place(src: Path, target: Path, move: bool) -> None:
    _claim(src, target)
    if move:
        os.replace(src, target)
    else:
        shutil.copyfile(src, target)


def _as_png(src: Path, target: Path, move: bool) -> None:
    """PNG files are placed as they are; others (BTAD's .bmp) are re-encoded losslessly as PNG."""
    if src.suffix.lower() == ".png":
        _place(src, target, move)
        return
    _claim(src, target)
    try:
        with Image.open(src) as img:
            img.load()
            img.save(target, format="PNG")
    except OSError as err:
        raise ImageError(f"{src}: cannot decode image ({err})") from None
    if move:
        src.unlink()


def binary_mask(src: Path, image: Path, target: Path) -> None:
    """A mask of any format and grey coding -> 0/255 PNG: every non-zero pixel is a defect (VisA's rule), so 0/1, 0/255
    and class-id masks (1, 2, ... one id per defect) all keep every defect. It must have the image's size."""
    try:
        with Image.open(src) as mask_img, Image.open(image) as img:
            values = np.asarray(mask_img.convert("L"))
            size = img.size
    except OSError as err:
        raise ImageError(f"{src}: cannot decode mask ({err})") from None
    if values.shape[::-1] != size:
        raise ImageError(f"{src}: mask is {values.shape[1]}x{values.shape[0]}, its image {image.name} is {size[0]}x{size[1]}")
    if not values.any():
        raise LayoutError(f"{src}: the mask of anomalous image {image.name} marks no pixel")
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((values > 0) * 255).astype(np.uint8)).save(target)


# ---------------------------------------------------------------- BTAD


def _is_btad_product(folder: Path) -> bool:
    return (folder / "train" / BTAD_NORMAL).is_dir()


def convert_btad(root: Path, dest: Path, categories: list[str], move: bool = True) -> list[str]:
    """BTAD (anomalib's BTech): products 01, 02, 03 with `train/ok`, `test/ok`, `test/ko` and
    `ground_truth/ko/<stem>.png|.bmp`. Images come as .bmp (01, 03) or .png (02): all become PNG; masks (PNG or
    BMP, named as their image) become `<stem>_mask.png`, binarised to 0/255."""
    root = dataset_root(root, _is_btad_product, "BTAD (expected <product>/train/ok/)")
    for product in _categories(root, _is_btad_product, categories):
        out = dest / product.name
        for image in _images(product / "train" / BTAD_NORMAL):
            _as_png(image, out / "train" / GOOD / f"{image.stem}.png", move)
        for image in _images(product / "test" / BTAD_NORMAL):
            _as_png(image, out / "test" / GOOD / f"{image.stem}.png", move)
        masks = {m.stem: m for m in _images(product / "ground_truth" / BTAD_ANOMALOUS)}
        for image in _images(product / "test" / BTAD_ANOMALOUS):
            mask = masks.get(image.stem)
            if mask is None:
                raise LayoutError(f"{image}: anomalous image has no mask (expected {product / 'ground_truth' / BTAD_ANOMALOUS / image.stem}.png or .bmp)")
            binary_mask(mask, image, out / "ground_truth" / BTAD_DEFECT / f"{image.stem}_mask.png")
            _as_png(image, out / "test" / BTAD_DEFECT / f"{image.stem}.png", move)
    return []


# ---------------------------------------------------------------- MPDD


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "train" / GOOD).is_dir()


def convert_mpdd(root: Path, dest: Path, categories: list[str], move: bool = True) -> list[str]:
    """MPDD: six metal-part categories in MVTec layout, whose masks are `<stem>_mask.png` or, in some copies,
    `<stem>.png`; both become `<stem>_mask.png`, binarised to 0/255."""
    root = dataset_root(root, _is_mvtec_category, "MPDD (expected <category>/train/good/)")
    for category in _categories(root, _is_mvtec_category, categories):
        out = dest / category.name
        for image in _images(category / "train" / GOOD):
            _place(image, out / "train" / GOOD / image.name, move)
        for defect in subdirs(category / "test") if (category / "test").is_dir() else []:
            truth = category / "ground_truth" / defect.name
            for image in _images(defect):
                if defect.name != GOOD:
                    candidates = [truth / f"{image.stem}_mask.png", truth / f"{image.stem}.png"]
                    mask = next((m for m in candidates if m.is_file()), None)
                    if mask is None:
                        raise LayoutError(f"{image}: anomalous image has no mask (expected {candidates[0]} or {candidates[1].name})")
                    binary_mask(mask, image, out / "ground_truth" / defect.name / f"{image.stem}_mask.png")
                _place(image, out / "test" / defect.name / image.name, move)
    return []


# ---------------------------------------------------------------- MVTec AD 2


def _is_ad2_category(folder: Path) -> bool:
    return (folder / "train" / GOOD).is_dir() and (folder / AD2_TEST).is_dir()


def convert_mvtec_ad2(root: Path, dest: Path, categories: list[str], move: bool = True) -> list[str]:
    """MVTec AD 2: `train/good`, `validation/good` (kept: thresholds are fitted on it), `test_public/{good,bad}` with
    `test_public/ground_truth/bad/<stem>_mask.png` -> test/. `test_private` and `test_private_mixed` have no public
    ground truth and are left out (MVTec's evaluation server scores them)."""
    root = dataset_root(root, _is_ad2_category, "MVTec AD 2 (expected <category>/train/good/ and <category>/test_public/)")
    without_truth = []
    for category in _categories(root, _is_ad2_category, categories):
        out = dest / category.name
        for image in _images(category / "train" / GOOD):
            _place(image, out / "train" / GOOD / image.name, move)
        for image in _images(category / VALIDATION / GOOD):
            _place(image, out / VALIDATION / GOOD / image.name, move)
        test = category / AD2_TEST
        for defect in subdirs(test):
            if defect.name == "ground_truth":
                continue
            for image in _images(defect):
                if defect.name != GOOD:
                    mask = test / "ground_truth" / defect.name / f"{image.stem}_mask.png"
                    if not mask.is_file():
                        raise LayoutError(f"{image}: anomalous image has no mask (expected {mask})")
                    binary_mask(mask, image, out / "ground_truth" / defect.name / f"{image.stem}_mask.png")
                _place(image, out / "test" / defect.name / image.name, move)
        if any((category / name).is_dir() for name in AD2_WITHOUT_TRUTH):
            without_truth.append(category.name)
    if not without_truth:
        return []
    return [f"{' and '.join(AD2_WITHOUT_TRUTH)} of {', '.join(without_truth)} left out (no public ground truth): the test split is {AD2_TEST}"]


CONVERTERS = {"btad": convert_btad, "mpdd": convert_mpdd, "mvtec_ad2": convert_mvtec_ad2}
