"""download for BTAD, MPDD and MVTec AD 2: small archives built here in each publisher's real layout (with its
quirks), served from a loopback HTTP server (or, for MPDD, pointed at by download.mpdd_path), converted to the
MVTec layout with a manifest."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2dprompt.pipeline.latents import validation_images
from d2dprompt.core.data.manifest import read_manifest
from tests.test_download import error_line, run_cli, server, sha256  # noqa: F401 (server is a fixture)

HW = (24, 32)  # small, and not square: a transposed mask would not fit


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*HW, 3), dtype=np.uint8)


def _mask(seed: int, high: int = 255) -> np.ndarray:
    mask = np.zeros(HW, np.uint8)
    mask[2 + seed % 5 : 12 + seed % 5, 4:20] = high
    return mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _zip(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


def _targz(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for item in sorted(root.iterdir()):
            tar.add(item, arcname=item.name)
    return buffer.getvalue()


# ---------------------------------------------------------------- BTAD

# product -> (image suffix, mask suffix, mask's "defect" value): 01 and 03 ship .bmp images, 02 .png; 03's masks are
# .bmp coded 0/1, the others 0/255 PNG
BTAD_PRODUCTS = {"01": (".bmp", ".png", 255), "02": (".png", ".png", 255), "03": (".bmp", ".bmp", 1)}


def fake_btad(root: Path, drop_mask: str | None = None) -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """btad.zip's layout: BTech_Dataset_transformed/<product>/{train/ok, test/ok, test/ko, ground_truth/ko}."""
    images, masks = {}, {}
    for p, (product, (suffix, mask_suffix, high)) in enumerate(BTAD_PRODUCTS.items()):
        base = root / "BTech_Dataset_transformed" / product
        for folder, count in (("train/ok", 3), ("test/ok", 1), ("test/ko", 2)):
            for i in range(count):
                images[f"{product}/{folder}/{i:04d}"] = pixels = _image(100 * p + 10 * len(folder) + i)
                _save(pixels, base / folder / f"{i:04d}{suffix}")
                if folder == "test/ko" and f"{product}/{i:04d}" != drop_mask:
                    masks[f"{product}/{i:04d}"] = (mask := _mask(i, high)) > 0
                    _save(mask, base / "ground_truth" / "ko" / f"{i:04d}{mask_suffix}")
    (root / "BTech_Dataset_transformed" / "LICENSE.txt").write_text("btad licence")
    return _zip(root), images, masks


def btad_params(server, archive: bytes, tmp_path: Path) -> dict:
    server.files["/papers/btad/btad.zip"] = archive
    return {"archives": ["btad"], "btad_url": f"{server.url}/papers/btad/btad.zip", "btad_sha256": sha256(archive),
            "archive_dir": str(tmp_path / "archives")}


def test_btad_zip_becomes_mvtec_layout_with_png_images_and_binary_masks(tmp_path, server):
    archive, images, masks = fake_btad(tmp_path / "build")
    result = run_cli(tmp_path, btad_params(server, archive, tmp_path))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "btad"
    rows = read_manifest(out / "manifest.csv")
    assert {r.category for r in rows} == {"01", "02", "03"} and len(rows) == 18
    assert [sum(r.split == s for r in rows) for s in ("train", "val", "test")] == [9, 0, 9]
    assert {r.defect_type for r in rows if r.label} == {"ko"} and sum(r.label for r in rows) == 6
    for row in rows:
        assert row.image_path.endswith(".png")  # every .bmp re-encoded
        folder = {"train": "train/ok", "test": "test/ko" if row.label else "test/ok"}[row.split]
        key = f"{row.category}/{folder}/{Path(row.image_path).stem}"
        np.testing.assert_array_equal(np.asarray(Image.open(out / row.image_path)), images[key])  # losslessly
        if row.label:
            assert row.mask_path == f"{row.category}/ground_truth/ko/{Path(row.image_path).stem}_mask.png"
            mask = np.asarray(Image.open(out / row.mask_path))
            assert set(np.unique(mask)) == {0, 255}  # 03's 0/1 BMP masks too
            np.testing.assert_array_equal(mask > 0, masks[f"{row.category}/{Path(row.image_path).stem}"])
    assert not list(out.rglob("*.bmp"))
    assert (out / "LICENSE.txt").read_text() == "btad licence"  # the licence travels with the images


def test_btad_without_a_mask_names_the_image(tmp_path, server):
    archive, _, _ = fake_btad(tmp_path / "build", drop_mask="03/0001")
    result = run_cli(tmp_path, btad_params(server, archive, tmp_path))
    assert result.exit_code == 1
    line = error_line(result)
    assert "btad.zip/BTech_Dataset_transformed/03/test/ko/0001.bmp: anomalous image has no mask" in line
    assert "ground_truth/ko/0001.png or .bmp" in line
    assert not (tmp_path / "out" / "btad").exists()


def test_a_zip_entry_escaping_the_target_is_refused(tmp_path, server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("BTech_Dataset_transformed/01/train/ok/0000.png", b"x")
        zf.writestr("../evil.png", b"x")
    result = run_cli(tmp_path, btad_params(server, buffer.getvalue(), tmp_path))
    assert result.exit_code == 1
    assert error_line(result).endswith("btad.zip: unsafe entry '../evil.png' ('..' in path)")
    assert not (tmp_path / "evil.png").exists() and not list((tmp_path / "out").glob("*/evil.png"))


# ---------------------------------------------------------------- MVTec AD 2


def fake_mvtec_ad2(root: Path) -> bytes:
    """mvtec_ad_2.tar.gz's layout: mvtec_ad_2/<cat>/{train/good, validation/good, test_public/{good, bad,
    ground_truth/bad/<stem>_mask.png}, test_private, test_private_mixed}."""
    for c, category in enumerate(("can", "vial")):
        base = root / "mvtec_ad_2" / category
        for folder, count in (("train/good", 4), ("validation/good", 2), ("test_public/good", 1), ("test_public/bad", 2),
                              ("test_private", 2), ("test_private_mixed", 1)):
            for i in range(count):
                _save(_image(50 * c + 7 * len(folder) + i), base / folder / f"{i:03d}_regular.png")
                if folder == "test_public/bad":
                    _save(_mask(i), base / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png")
    (root / "mvtec_ad_2" / "license.txt").write_text("CC BY-NC-SA 4.0")
    return _targz(root)


def test_mvtec_ad2_keeps_its_validation_split_and_tests_on_test_public_only(tmp_path, server):
    archive = fake_mvtec_ad2(tmp_path / "build")
    server.files["/download/mvtec_ad_2.tar.gz"] = archive
    download = {"archives": ["mvtec_ad2"], "mvtec_ad2_url": f"{server.url}/download/mvtec_ad_2.tar.gz",
                "mvtec_ad2_sha256": sha256(archive), "archive_dir": str(tmp_path / "archives")}
    result = run_cli(tmp_path, download)
    assert result.exit_code == 0, result.output
    assert "mvtec_ad2: test_private and test_private_mixed of can, vial left out (no public ground truth): the test split is test_public" in result.output
    assert "train 8, val 4, test 6 (2 good, 4 anomalous)" in result.output
    out = tmp_path / "out" / "mvtec_ad2"
    rows = read_manifest(out / "manifest.csv")
    assert {(r.category, r.split, r.defect_type) for r in rows} == {
        (c, s, d) for c in ("can", "vial") for s, d in (("train", "good"), ("val", "good"), ("test", "good"), ("test", "bad"))
    }
    assert {r.image_path for r in rows if r.split == "val"} == {f"{c}/validation/good/00{i}_regular.png" for c in ("can", "vial") for i in (0, 1)}
    assert {r.mask_path for r in rows if r.label} == {f"{c}/ground_truth/bad/00{i}_regular_mask.png" for c in ("can", "vial") for i in (0, 1)}
    assert not list(out.rglob("test_private*"))
    assert (out / "license.txt").read_text() == "CC BY-NC-SA 4.0"
    # the dataset's own validation images are the validation split: no training image is held out for it
    assert validation_images(rows, 0.2, seed=0) == set()
    mixed = rows + [r.__class__(**{**r.__dict__, "dataset": "x", "category": "other", "image_path": f"other/{i}.png"})
                    for i, r in enumerate(r for r in rows if r.split == "train")]
    assert {p.split("/")[0] for p in validation_images([r for r in mixed if not (r.category == "other" and r.split == "val")], 0.2, seed=0)} == {"other"}


# ---------------------------------------------------------------- MPDD


def fake_mpdd(root: Path) -> Path:
    """MPDD/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}: bracket_black's masks are named
    <stem>_mask.png, connector's <stem>.png (both occur in the copies in circulation)."""
    for c, (category, mask_name) in enumerate((("bracket_black", "{}_mask.png"), ("connector", "{}.png"))):
        base = root / "MPDD" / category
        for folder, count in (("train/good", 3), ("test/good", 1), ("test/scratches", 2)):
            for i in range(count):
                _save(_image(30 * c + len(folder) + i), base / folder / f"{i:03d}.png")
                if folder == "test/scratches":
                    _save(_mask(i), base / "ground_truth" / "scratches" / mask_name.format(f"{i:03d}"))
    return root / "MPDD"


def test_mpdd_is_a_manual_download_and_says_where_to_get_it(tmp_path):
    result = run_cli(tmp_path, {"archives": ["mpdd"]})
    assert result.exit_code == 1
    assert error_line(result).endswith("download.mpdd_path: 'mpdd' is a manual download: fetch it from https://github.com/stepanje/MPDD "
                                       "and set download.mpdd_path to the archive or its extracted folder")
    missing = run_cli(tmp_path, {"archives": ["mpdd"], "mpdd_path": str(tmp_path / "MPDD.zip")})
    assert missing.exit_code == 1
    assert error_line(missing).startswith(f"{tmp_path / 'MPDD.zip'}: not found (download.mpdd_path); mpdd is a manual download")


@pytest.mark.parametrize("given", ["zip", "folder"])
def test_mpdd_from_its_archive_or_folder_with_either_mask_naming(tmp_path, given):
    folder = fake_mpdd(tmp_path / "build")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    if given == "zip":
        path = tmp_path / "MPDD.zip"
        path.write_bytes(_zip(folder.parent))
    else:
        path = folder
    result = run_cli(tmp_path, {"archives": ["mpdd"], "mpdd_path": str(path)})
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "mpdd"
    rows = read_manifest(out / "manifest.csv")
    assert {r.category for r in rows} == {"bracket_black", "connector"} and len(rows) == 12
    assert {r.mask_path for r in rows if r.label} == {f"{c}/ground_truth/scratches/00{i}_mask.png" for c in ("bracket_black", "connector") for i in (0, 1)}
    for row in (r for r in rows if r.label):
        assert set(np.unique(np.asarray(Image.open(out / row.mask_path)))) == {0, 255}
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # the user's folder is copied, not moved
