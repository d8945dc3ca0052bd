"""Tests for d2dprompt.core.data.manifest: CSV round trip, bad files, MVTec layout scanning."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from d2dprompt.core.data.manifest import (
    COLUMNS,
    LayoutError,
    ManifestError,
    ManifestRow,
    manifest_summary,
    read_manifest,
    scan_mvtec_layout,
    write_manifest,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # the scanner checks layout only; decoding is the download stage's job


def make_layout(root: Path, category: str = "tile") -> Path:
    for name in ("001.png", "000.png"):
        _touch(root / category / "train" / "good" / name)
    _touch(root / category / "test" / "good" / "000.png")
    for name in ("000.png", "001.png"):
        _touch(root / category / "test" / "crack" / name)
        _touch(root / category / "ground_truth" / "crack" / name.replace(".png", "_mask.png"))
    return root


def test_rows_round_trip(tmp_path):
    rows = [
        ManifestRow("sample", "tile", "train", 0, "good", "tile/train/good/000.png", ""),
        ManifestRow("sample", "tile", "test", 1, "crack", "tile/test/crack/0,1.png", "tile/ground_truth/crack/0,1_m.png"),
    ]
    path = tmp_path / "sub" / "manifest.csv"
    write_manifest(rows, path)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert read_manifest(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["manifest.csv"]  # no temp file left


def test_row_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="split"):
        ManifestRow("d", "c", "validation", 0, "good", "a.png", "")
    with pytest.raises(ValueError, match="defect_type"):
        ManifestRow("d", "c", "test", 1, "good", "a.png", "m.png")
    with pytest.raises(ValueError, match="mask_path"):
        ManifestRow("d", "c", "test", 0, "good", "a.png", "m.png")
    assert ManifestRow("d", "c", "test", 1, "crack", "a.png", "").mask_path == ""  # a category without masks


def test_bad_header_and_bad_row_name_the_file(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("dataset,category\nx,y\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv: header must be"):
        read_manifest(path)
    path.write_text(",".join(COLUMNS) + "\nsample,tile,train,0,good,a.png,\nsample,tile,train,yes,good,b.png,\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}:3: label must be 0 or 1")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "missing.csv")


def test_scan_lists_every_image_sorted(tmp_path):
    root = make_layout(tmp_path / "data")
    make_layout(root, "disc")
    (root / "license.txt").write_text("x")
    rows = scan_mvtec_layout(root, "mine")
    assert len(rows) == 2 * 5
    assert rows == sorted(rows, key=lambda r: (r.category, r.split, r.defect_type, r.image_path))
    crack = [r for r in rows if r.defect_type == "crack" and r.category == "tile"]
    assert [(r.label, r.image_path, r.mask_path) for r in crack] == [
        (1, "tile/test/crack/000.png", "tile/ground_truth/crack/000_mask.png"),
        (1, "tile/test/crack/001.png", "tile/ground_truth/crack/001_mask.png"),
    ]
    assert {r.dataset for r in rows} == {"mine"}
    assert all(r.label == 0 and r.mask_path == "" for r in rows if r.split == "train")
    assert [r.category for r in scan_mvtec_layout(root, "mine", ["disc"])] == ["disc"] * 5
    assert manifest_summary(rows) == "2 categories (disc, tile), train 4, test 6 (2 good, 4 anomalous)"


def test_missing_mask_names_the_image(tmp_path):
    root = make_layout(tmp_path)
    (root / "tile" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(LayoutError) as info:
        scan_mvtec_layout(root, "x")
    assert str(info.value).startswith(str(root / "tile" / "test" / "crack" / "001.png"))


def test_a_category_without_ground_truth_is_listed_without_masks_and_a_partial_one_refused(tmp_path):
    """A factory's defect images often come without pixel masks: a category with no ground_truth/ is read with
    empty mask_paths (image-level metrics only, and the summary says so); with ground_truth/ every mask must be there."""
    root = make_layout(tmp_path)
    make_layout(root, "disc")
    shutil.rmtree(root / "tile" / "ground_truth")
    rows = scan_mvtec_layout(root, "x")
    assert [r.mask_path for r in rows if r.category == "tile" and r.label] == ["", ""]
    assert all(r.mask_path for r in rows if r.category == "disc" and r.label)
    assert manifest_summary(rows).endswith("; no masks in tile: image-level metrics only there")
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    assert read_manifest(path) == rows
    (root / "disc" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(LayoutError, match="a category without disc/ground_truth/ is scored at image level only"):
        scan_mvtec_layout(root, "x")
    shutil.rmtree(root / "disc")
    shutil.rmtree(root / "tile" / "test")  # normal images only: listed, with no test row
    assert {(r.split, r.label) for r in scan_mvtec_layout(root, "x")} == {("train", 0)}


def _nothing(root: Path) -> None:
    pass


def _flat_images(root: Path) -> None:
    _touch(root / "a" / "b.png")


def _defect_in_train(root: Path) -> None:
    make_layout(root)
    _touch(root / "tile" / "train" / "bad" / "0.png")


def _no_train(root: Path) -> None:
    _touch(root / "tile" / "test" / "good" / "0.png")


def _empty_test(root: Path) -> None:  # no test/ at all is a folder of normal images only; an empty one is a mistake
    _touch(root / "tile" / "train" / "good" / "0.png")
    (root / "tile" / "test").mkdir()


@pytest.mark.parametrize(
    "breakage, named",
    [(_nothing, ""), (_flat_images, ""), (_defect_in_train, "tile/train"), (_no_train, "tile/train/good"),
     (_empty_test, "tile/test")],
)
def test_layout_errors_name_the_folder(tmp_path, breakage, named):
    root = tmp_path / "data"
    root.mkdir()
    breakage(root)
    with pytest.raises(LayoutError) as info:
        scan_mvtec_layout(root, "x")
    assert str(info.value).startswith(f"{root / named if named else root}: ")


def test_category_folder_and_unknown_category(tmp_path):
    root = make_layout(tmp_path / "data")
    with pytest.raises(LayoutError, match="one category folder"):
        scan_mvtec_layout(root / "tile", "x")
    with pytest.raises(LayoutError, match=r"no category bottle \(found: tile\)"):
        scan_mvtec_layout(root, "x", ["bottle"])
    with pytest.raises(LayoutError, match="dataset folder not found"):
        scan_mvtec_layout(tmp_path / "nowhere", "x")


def test_a_validation_folder_becomes_split_val_and_holds_normal_images_only(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(SAMPLE / "disc", root / "disc")
    (root / "disc" / "validation" / "good").mkdir(parents=True)
    for i, image in enumerate(sorted((root / "disc" / "train" / "good").iterdir())[:2]):
        shutil.copy(image, root / "disc" / "validation" / "good" / f"v{i}.png")
    rows = scan_mvtec_layout(root, "ds")
    assert [r.image_path for r in rows if r.split == "val"] == ["disc/validation/good/v0.png", "disc/validation/good/v1.png"]
    assert all(r.label == 0 for r in rows if r.split == "val")
    assert ", val 2, test" in manifest_summary(rows)
    (root / "disc" / "validation" / "scratch").mkdir()
    with pytest.raises(LayoutError, match=r"validation: the validation split holds normal images only, in validation/good/ \(found scratch\)"):
        scan_mvtec_layout(root, "ds")


def test_two_images_sharing_a_stem_in_a_defect_folder_are_refused_naming_both(tmp_path):
    """000.png and 000.jpg would both be paired with 000_mask.png, silently."""
    root = make_layout(tmp_path)
    _touch(root / "tile" / "test" / "crack" / "000.jpg")
    with pytest.raises(LayoutError, match=r"000\.jpg and .*000\.png: two images named '000' share one mask \(000_mask\.png\)"):
        scan_mvtec_layout(root, "x")
    (root / "tile" / "test" / "crack" / "000.jpg").rename(root / "tile" / "test" / "good" / "000.jpg")
    assert scan_mvtec_layout(root, "x")  # normal test images have no mask to share
