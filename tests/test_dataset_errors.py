"""Data that is wrong in a quiet way: each case must stop with one clear line, be skipped with its reason,
or be reported as undefined, never turn into a plausible-looking number."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from d2dprompt.pipeline import download
from d2dprompt.core.data.images import ImageError, load_mask
from d2dprompt.core.data.manifest import read_manifest
from d2dprompt.core.eval.metrics import f1_max_threshold, image_metrics, pixel_metrics, summarize
from d2dprompt.core.runtime.outputs import write_json
from d2dprompt.core.eval.report import write_metrics
from d2dprompt.core.eval.thresholds import f1_at
from tests.test_predict import SCRATCH, _reuse_tiny, params_file, prompts_dir, read_jsonl, run  # noqa: F401 (fixtures)

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
MASK_RULE = "MVTec masks hold 0 and one foreground value"


def strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{path}: holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def failed_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- a category without defective test images


def category(labels, scores, masks, maps, image_threshold=0.5, pixel_threshold=0.5) -> dict[str, float]:
    """One category's metrics, computed as evaluate.evaluate_dataset does."""
    labels, scores, masks, maps = map(np.asarray, (labels, scores, masks, maps))
    return {
        **image_metrics(labels, scores),
        **pixel_metrics(masks, maps, 0.3),
        "image_F1": f1_at(labels == 1, scores >= image_threshold),
        "pixel_F1": f1_at(masks, maps >= pixel_threshold),
    }


def two_categories() -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 8, 8), bool)
    masks[2:, 2:5, 2:5] = True
    maps = np.where(masks, 0.8, 0.2) + rng.uniform(-0.1, 0.1, masks.shape)
    defective = category([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9], masks, maps)
    # no defective test image, and one normal image scores above the threshold (a false positive)
    clean = category([0, 0, 0], [0.2, 0.8, 0.3], np.zeros((3, 8, 8), bool), rng.uniform(0, 0.6, (3, 8, 8)))
    return {"defective": defective, "clean": clean}


def test_undefined_metrics_are_left_out_of_means_and_written_as_null(tmp_path):
    per_category = two_categories()
    summary = summarize(per_category)
    assert summary["mean"]["image_F1"] == per_category["defective"]["image_F1"] == pytest.approx(0.8)
    assert summary["mean"]["pixel_F1"] == per_category["defective"]["pixel_F1"]
    thresholds = {"image": 0.5, "pixel": 0.5, "source": "fixed"}
    json_path, md_path = write_metrics(tmp_path, "toy", summary, thresholds, {"image_AUROC": 1.0})

    record = strict_json(json_path)
    assert set(record["per_category"]["clean"].values()) == {None}  # every metric needs an anomalous image
    assert record["mean"]["image_F1"] == pytest.approx(0.8)
    assert record["mean_over"] == dict.fromkeys(summary["mean"], 1)
    assert record["undefined"] == dict.fromkeys(summary["mean"], ["clean"])
    table = md_path.read_text()
    assert "| clean | " + " | ".join(["n/a"] * len(summary["mean"])) + " |" in table
    assert "n/a: undefined for that category" in table and "image_F1 1 of 2" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.json", "toy.md"]


def test_a_table_without_undefined_metrics_has_no_footnote(tmp_path):
    summary = summarize({"defective": two_categories()["defective"]})
    json_path, md_path = write_metrics(tmp_path, "toy", summary, {"image": 0.5, "pixel": 0.5, "source": "fixed"}, {})
    assert strict_json(json_path)["undefined"] == {} and "n/a" not in md_path.read_text()


NO_POSITIVES = [
    ("f1_at, false positives", lambda: f1_at(np.zeros(4, bool), np.array([1, 0, 1, 0], bool))),
    ("f1_at, no predictions", lambda: f1_at(np.zeros(4, bool), np.zeros(4, bool))),
    ("f1_at, pixels", lambda: f1_at(np.zeros((2, 3, 3), bool), np.ones((2, 3, 3), bool))),
    ("f1_max_threshold", lambda: f1_max_threshold(np.zeros(4), np.arange(4.0))[0]),
    ("image_F1Max", lambda: image_metrics(np.zeros(4), np.arange(4.0))["image_F1Max"]),
    ("pixel_F1Max", lambda: pixel_metrics(np.zeros((2, 3, 3)), np.ones((2, 3, 3)), 0.3)["pixel_F1Max"]),
]


@pytest.mark.parametrize("compute", [c for _, c in NO_POSITIVES], ids=[n for n, _ in NO_POSITIVES])
def test_f1_without_anomalous_samples_is_undefined(compute):
    assert math.isnan(compute())


def test_write_json_refuses_nan_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'm.json'}: cannot write NaN or infinity as JSON"):
        write_json(tmp_path / "m.json", {"image_AUROC": float("nan")})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- masks that are not binary


BAD_MASKS = {
    "background 3": (np.array([[3, 3], [3, 255]], np.uint8), "3, 255"),
    "0, 3 and 255": (np.array([[0, 3], [0, 255]], np.uint8), "0, 3, 255"),
    "no background": (np.full((2, 2), 255, np.uint8), "255"),
    "anti-aliased": (np.arange(256, dtype=np.uint8).reshape(16, 16), "0, 1, 2, 3, 4, 5, ... (256 values)"),
}


@pytest.mark.parametrize("case", BAD_MASKS)
def test_a_mask_that_is_not_binary_stops_naming_file_and_values(case, tmp_path):
    values, shown = BAD_MASKS[case]
    Image.fromarray(values).save(tmp_path / "mask.png")
    with pytest.raises(ImageError) as info:
        load_mask(tmp_path / "mask.png", values.shape)
    assert str(info.value) == f"{tmp_path / 'mask.png'}: not a binary mask (values {shown}); {MASK_RULE}"


GOOD_MASKS = {
    "0/255": np.array([[0, 255], [0, 0]], np.uint8),
    "0/1": np.array([[0, 1], [1, 0]], np.uint8),
    "empty": np.zeros((2, 2), np.uint8),
    "16-bit": np.array([[0, 65535], [0, 0]], np.uint16),
    "one colour": np.array([[[0, 0, 0], [200, 0, 0]], [[200, 0, 0], [0, 0, 0]]], np.uint8),
}


@pytest.mark.parametrize("case", GOOD_MASKS)
def test_binary_masks_load(case, tmp_path):
    values = GOOD_MASKS[case]
    Image.fromarray(values).save(tmp_path / "mask.png")
    expected = values.max(axis=-1) > 0 if values.ndim == 3 else values > 0
    np.testing.assert_array_equal(load_mask(tmp_path / "mask.png", values.shape[:2]), expected)


def test_class_id_masks_load_when_asked(tmp_path):
    values = np.array([[0, 1], [2, 0]], np.uint8)  # VisA: one id per defect class
    Image.fromarray(values).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "mask.png", (2, 2), binary=False), values > 0)


# ---------------------------------------------------------------- the download stage on a folder dataset


@pytest.fixture
def disc(tmp_path) -> Path:
    """A folder dataset holding the sample's `disc` category."""
    root = tmp_path / "dataset"
    shutil.copytree(SAMPLE / "disc", root / "disc")
    return root


def run_download(tmp_path: Path, folder: Path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"download": {"folders": {"folder": str(folder)}}, "train": {"datasets": ["folder"]}, "evaluate": {"datasets": ["folder"]}}
        )
    )
    return CliRunner().invoke(download.app, ["--params", str(params), "--out", str(tmp_path / "out")])


def test_download_stops_on_a_mask_whose_background_is_not_0(tmp_path, disc):
    mask = disc / "disc" / "ground_truth" / "stain" / "000_mask.png"
    values = np.asarray(Image.open(mask))
    Image.fromarray(np.where(values == 0, 3, 255).astype(np.uint8)).save(mask)
    line = failed_line(run_download(tmp_path, disc)).removeprefix("error: ")
    assert line == f"{mask}: not a binary mask (values 3, 255); {MASK_RULE}"
    assert not (tmp_path / "out" / "folder").exists()


def _outside_file(tmp_path: Path, disc: Path) -> tuple[Path, Path]:
    link, target = disc / "disc" / "train" / "good" / "000.png", tmp_path / "elsewhere" / "000.png"
    target.parent.mkdir()
    shutil.move(link, target)
    link.symlink_to(target)
    return link, target


def _outside_folder(tmp_path: Path, disc: Path) -> tuple[Path, Path]:
    link, target = disc / "disc" / "test" / "good", tmp_path / "elsewhere"
    shutil.move(link, target)
    link.symlink_to(target, target_is_directory=True)
    return link, target


def _outside_mask(tmp_path: Path, disc: Path) -> tuple[Path, Path]:
    link, target = disc / "disc" / "ground_truth" / "stain" / "000_mask.png", tmp_path / "000_mask.png"
    shutil.move(link, target)
    link.symlink_to(Path("..", "..", "..", "..", "000_mask.png"))  # relative, climbing out
    return link, target


def _outside_notice(tmp_path: Path, disc: Path) -> tuple[Path, Path]:
    link, target = disc / "LICENSE", tmp_path / "secret.txt"
    target.write_text("not part of the dataset\n")
    link.symlink_to(target)
    return link, target


@pytest.mark.parametrize(
    "make", [_outside_file, _outside_folder, _outside_mask, _outside_notice], ids=["file", "folder", "relative mask", "licence"]
)
def test_a_symlink_leading_out_of_a_folder_dataset_is_refused(make, tmp_path, disc):
    link, target = make(tmp_path, disc)
    line = failed_line(run_download(tmp_path, disc)).removeprefix("error: ")
    assert line == f"{link}: symbolic link to {target}, outside the dataset folder; copy the file in instead"
    assert not (tmp_path / "out" / "folder").exists() and list((tmp_path / "out").iterdir()) == []


def test_a_symlink_within_a_folder_dataset_is_followed(tmp_path, disc):
    link = disc / "disc" / "test" / "good" / "000.png"
    link.unlink()
    link.symlink_to(Path("..", "..", "train", "good", "000.png"))
    result = run_download(tmp_path, disc)
    assert result.exit_code == 0, result.output
    copy = tmp_path / "out" / "folder" / "disc" / "test" / "good" / "000.png"
    assert not copy.is_symlink() and copy.read_bytes() == (disc / "disc" / "train" / "good" / "000.png").read_bytes()
    assert "disc/test/good/000.png" in {r.image_path for r in read_manifest(tmp_path / "out" / "folder" / "manifest.csv")}


# ---------------------------------------------------------------- predict on a folder with odd files


def test_predict_lists_skipped_files_and_refuses_images_smaller_than_the_model(prompts_dir, params_file, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(SCRATCH, inputs / "good.png")
    Image.new("RGB", (1, 1)).save(inputs / "dot.png")
    Image.new("RGB", (200, 63)).save(inputs / "strip.png")  # one side under the model's 64
    (inputs / "notes.txt").write_text("not an image\n")
    (inputs / "scan.raw").write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    result = run([inputs, "--out", out], prompts_dir, params_file)
    assert result.exit_code == 0, result.output
    assert [r["key"] for r in read_jsonl(out)] == ["good.png"]
    smaller = "smaller than the model's input side 64 (the input size of the trained run)"
    assert (out / "errors.txt").read_text().splitlines() == [
        f"{inputs / 'dot.png'}: image is 1x1, {smaller}",
        f"{inputs / 'notes.txt'}: not an image file (suffix '.txt'; predict reads {SUFFIXES})",
        f"{inputs / 'scan.raw'}: not an image file (suffix '.raw'; predict reads {SUFFIXES})",
        f"{inputs / 'strip.png'}: image is 200x63, {smaller}",
    ]
    summary = " ".join(result.stdout.split())  # the counts add up: 3 images (1 predicted, 2 not) and 2 other files
    assert "1 of 3 images" in summary and "; 2 images could not be predicted and 2 other files skipped (listed in" in summary
    assert f"skipped: {inputs / 'dot.png'}: image is 1x1" in result.stderr


def test_predict_on_a_folder_without_images_names_what_it_skipped(prompts_dir, params_file, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x\n")
    result = run([tmp_path / "in", "--out", tmp_path / "out"], prompts_dir, params_file)
    assert failed_line(result) == f"error: {tmp_path / 'in'}: no images ({SUFFIXES}) under this folder; 1 other file skipped"


def test_predict_exits_1_when_every_image_is_too_small(prompts_dir, params_file, tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    result = run([tmp_path / "dot.png", "--out", tmp_path / "out"], prompts_dir, params_file)
    assert failed_line(result) == f"error: {tmp_path / 'dot.png'}: no image could be predicted"
    assert (tmp_path / "out" / "errors.txt").read_text().startswith(f"{tmp_path / 'dot.png'}: image is 1x1")


SUFFIXES = ".bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp"


def test_a_folder_prepared_by_anomalib_with_masks_named_after_their_images_is_read(tmp_path, disc):
    """anomalib's VisA split names a mask after its image (ground_truth/<defect>/000.png): it was refused with
    "anomalous image has no mask"."""
    masks = sorted((disc / "disc" / "ground_truth").glob("*/*_mask.png"))
    for mask in masks:
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    result = run_download(tmp_path, disc)
    assert result.exit_code == 0, result.output
    rows = read_manifest(tmp_path / "out" / "folder" / "manifest.csv")
    assert sum(bool(r.mask_path) for r in rows) == len(masks) and all(r.mask_path.endswith(".png") for r in rows if r.label)


def test_a_folder_with_btads_ok_ko_names_says_what_to_rename(tmp_path, disc):
    (disc / "disc" / "train" / "good").rename(disc / "disc" / "train" / "ok")
    line = failed_line(run_download(tmp_path, disc))
    assert line.endswith("train/ok: BTAD's ok/ko naming; MVTec layout names normal images good/: rename train/ok and test/ok to good "
                         "(test/ko and ground_truth/ko may stay), or list btad in download.archives")
