"""Tests for d2dprompt.core.data.images: mode conversion, corrupt files, masks, resizing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from d2dprompt.core.data.images import ImageError, load_mask, load_rgb, resize_mask, resize_rgb


def _png_16bit(path, array: np.ndarray, colour_type: int) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB): colour type 0 = grey, 2 = RGB."""
    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_rgb_round_trip(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grey_is_replicated_to_three_channels(tmp_path, rgb):
    grey = rgb[..., 0]
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_alpha_and_palette_are_converted(tmp_path, rgb):
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgba.png"), rgb)
    Image.fromarray(rgb[..., 0], mode="L").convert("LA").save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").shape == (12, 10, 3)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    palette_rgb = load_rgb(tmp_path / "p.png")
    assert palette_rgb.shape == (12, 10, 3) and len(np.unique(palette_rgb.reshape(-1, 3), axis=0)) <= 8


def test_16bit_grey_and_rgb_scale_to_8bit(tmp_path):
    grey16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    _png_16bit(tmp_path / "g16.png", grey16, colour_type=0)
    out = load_rgb(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])
    assert (out[..., 0] == out[..., 2]).all()
    rgb16 = np.array([[[65535, 0, 257 * 40]]], dtype=np.uint16)
    _png_16bit(tmp_path / "c16.png", rgb16, colour_type=2)
    np.testing.assert_array_equal(load_rgb(tmp_path / "c16.png")[0, 0], [255, 0, 40])


def test_truncated_png_raises_naming_the_file(tmp_path, rgb):
    good = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"^.*cut\.png: ") as info:
        load_rgb(bad)
    assert str(info.value).startswith(str(bad))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_garbage_and_missing_files_raise(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="x.png: cannot decode"):
        load_rgb(tmp_path / "x.png")
    with pytest.raises(ImageError, match="nope.png: image file not found"):
        load_rgb(tmp_path / "nope.png")


def test_mask_is_bool_with_its_one_foreground_value_as_defect(tmp_path):
    values = np.array([[0, 3, 3], [0, 0, 3]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png", (2, 3)), values > 0)
    _png_16bit(tmp_path / "m16.png", np.array([[0, 65535], [65535, 0]], dtype=np.uint16), colour_type=0)
    np.testing.assert_array_equal(load_mask(tmp_path / "m16.png", (2, 2)), [[False, True], [True, False]])
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[1, 1, 2] = 200
    Image.fromarray(colour).save(tmp_path / "mc.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "mc.png", (2, 2)), [[False, False], [False, True]])


def test_missing_mask_raises_naming_the_file(tmp_path):
    with pytest.raises(ImageError) as info:
        load_mask(tmp_path / "000_mask.png", (4, 4))
    assert str(info.value).startswith(str(tmp_path / "000_mask.png"))
    assert "not found" in str(info.value)


def test_mask_of_another_size_raises(tmp_path):
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageError, match=r"m\.png: mask is 4x5, image is 5x4"):
        load_mask(tmp_path / "m.png", (5, 4))


def test_resize_rgb_and_mask():
    img = np.zeros((40, 30, 3), np.uint8)
    img[:, 15:] = 200
    small = resize_rgb(img, 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    assert small[:, 0].max() < 10 and small[:, -1].min() > 190
    assert resize_rgb(img[:16, :16], 16) is not img
    mask = np.zeros((40, 30), bool)
    mask[10:20, 5:10] = True
    resized = resize_mask(mask, 20)
    assert resized.dtype == bool and resized.shape == (20, 20)
    assert set(np.unique(resized)) == {False, True}
    assert 0.03 < resized.mean() < 0.06  # the defect keeps its share of the area (50/1200 = 0.042)


@pytest.mark.parametrize("orientation, turned", [(1, False), (6, True), (8, True), (3, False)])
def test_exif_orientation_is_applied_to_images_and_masks_alike(tmp_path, orientation, turned):
    """A JPEG tagged 'rotate 90' (orientation 6) holds its pixels on their side: read upright, it fits its mask."""
    from d2dprompt.core.data.images import rgb_of

    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :5] = 255  # a bright left edge, to see where it goes
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "img.jpg", exif=exif, quality=100)
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[:, :5] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png", exif=exif)
    image = load_rgb(tmp_path / "img.jpg")
    assert image.shape == ((20, 10, 3) if turned else (10, 20, 3))
    assert load_mask(tmp_path / "mask.png", image.shape[:2]).shape == image.shape[:2]
    assert rgb_of((tmp_path / "img.jpg").read_bytes()).shape == image.shape
    with Image.open(tmp_path / "img.jpg") as opened:
        assert rgb_of(opened).shape == image.shape


def test_encoded_bytes_above_the_pixel_limit_are_refused_from_their_header():
    """What a server receives: a 13000 x 13000 PNG of a few hundred bytes decoded to 10.9 GB before; its header is
    enough to refuse it. The same bytes decode under a limit they fit."""
    from d2dprompt.core.data.images import rgb_of

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match=r"^images\[0\]: 13000x13000 is 169\.0 megapixels, larger than the 40 megapixel limit"):
        rgb_of(bomb, "images[0]", 40e6)
    small = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(small, format="PNG")
    assert rgb_of(small.getvalue(), "x", 40e6).shape == (6, 8, 3)


def test_a_16_bit_grey_image_decodes_down_like_any_other(tmp_path):
    """The app decodes large uploads down to --work-side: a 16-bit grey PNG of 4500 px was refused with "cannot
    decode image (image has wrong mode)" (Pillow's reduce step has no 16-bit mode) while predict and the API took it."""
    values = np.linspace(0, 65535, 4500 * 4200).reshape(4200, 4500).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    pixels = load_rgb(tmp_path / "grey16.png", max_side=1024)
    assert pixels.shape == (956, 1024, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
