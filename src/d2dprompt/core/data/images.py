"""Image and mask I/O: decode any common PNG/JPEG/TIFF flavour to uint8 RGB or a bool mask.

Every loader fully decodes the file, so a truncated or corrupt image fails here
with an `ImageError` whose message starts with the file's path, and applies the EXIF orientation (`upright`).

Masks follow MVTec AD: 0 is background and at most one other value marks the defect (255 in MVTec
AD, any one value here; colour masks are read by their brightest channel). Anything else stops
with one line naming the file and the values found: a background that is not 0 (e.g. 3 and 255), a
mask without any 0 pixel, or several defect values (anti-aliased or JPEG-saved masks), because
reading "any value > 0 is defect" would silently turn them into much larger defects. Class-id masks
(VisA) are read with `binary=False` and converted to 0/255 by the download stage.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly, never load as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class ImageError(ValueError):
    """An image or mask file that is missing, unreadable, or does not fit its image."""


def _open_decoded(path: Path, what: str, max_side: int | None = None) -> Image.Image:
    if not path.is_file():
        raise ImageError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as img:
            if max_side is not None:
                img.draft(img.mode, (max_side, max_side))  # a JPEG decodes at 1/2..1/8 scale: never held at full size
            img.load()
            # `load` decodes lazily-opened frames; upright() copies, detaching the pixels from the closed file.
            img = upright(img)
        if max_side is not None and max(img.size) > max_side:
            # keeps the aspect ratio; Pillow's reduce() before the resize has no 16-bit or float modes
            img.thumbnail((max_side, max_side), reducing_gap=None if img.mode.startswith("I") or img.mode == "F" else 2.0)
        return img
    except _DECODE_ERRORS as err:
        raise ImageError(f"{path}: cannot decode {what} ({err})") from None


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (a phone's JPEG tagged "rotate 90" holds its
    pixels on their side), so an image and its mask line up whatever tags either carries. Always a copy."""
    return ImageOps.exif_transpose(img) or img.copy()


def _to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    """Scale integer/float values in [0, full_scale] to uint8."""
    scaled = np.asarray(values, dtype=np.float64) * (255.0 / full_scale)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG/TIFF); Pillow may hand it over as 32-bit 'I' holding 0..65535.
        grey = _to_uint8(np.asarray(img), 65535.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        grey = _to_uint8(values, 1.0 if values.max(initial=0.0) <= 1.0 else 255.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency: go through RGBA so Pillow does not warn
    # Alpha is dropped, not composited: dataset images with alpha are opaque in practice.
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_rgb(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Decode `path` to a uint8 HxWx3 array (grey, alpha, palette and 16-bit images are converted); with `max_side`,
    downscaled (aspect kept) so that its longer side is at most that, a JPEG already while it decodes."""
    path = Path(path)
    img = _open_decoded(path, "image", max_side)
    try:
        rgb = _pil_to_rgb(img)
    except _DECODE_ERRORS as err:
        raise ImageError(f"{path}: cannot convert image mode {img.mode} to RGB ({err})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{path}: decoded to shape {rgb.shape}, expected HxWx3")
    return rgb


def _require_binary(path: Path, values: np.ndarray) -> None:
    top = values.max()
    if values.min() == 0 and not np.any((values != 0) & (values != top)):
        return
    found = np.unique(values).astype(np.float64)
    shown = ", ".join(f"{v:g}" for v in found[:6]) + (f", ... ({found.size} values)" if found.size > 6 else "")
    raise ImageError(f"{path}: not a binary mask (values {shown}); MVTec masks hold 0 and one foreground value")


def load_mask(path: str | Path, shape_hw: tuple[int, int], binary: bool = True) -> np.ndarray:
    """Decode a defect mask to bool HxW; it must be `shape_hw` in size.

    binary=True (MVTec layout): 0 and at most one other value, see the module docstring.
    binary=False (class-id masks): any value > 0 is defect.
    """
    path = Path(path)
    img = _open_decoded(path, "mask")
    if img.mode in ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
        # Colour-coded masks: a defect is any non-zero colour channel (alpha ignored).
        channels = np.asarray(img.convert("RGB") if img.mode != "LA" else img.getchannel("L"))
        values = channels.max(axis=2) if channels.ndim == 3 else channels
    else:  # 1, L, P (class ids), I;16, I, F
        values = np.asarray(img)
    if values.ndim != 2:
        raise ImageError(f"{path}: mask decoded to shape {values.shape}, expected HxW")
    expected = tuple(int(s) for s in shape_hw)
    if values.shape != expected:
        raise ImageError(f"{path}: mask is {values.shape[0]}x{values.shape[1]}, image is {expected[0]}x{expected[1]}")
    if binary:
        _require_binary(path, values)
    return values > 0


def rgb_of(image, name: str = "image", max_bytes_pixels: float | None = None) -> np.ndarray:
    """A path, encoded bytes, a PIL image or an HxWx3 uint8 array -> uint8 HxWx3 (converted as load_rgb converts);
    anything else stops with one line starting with `name`. Encoded bytes (what a server receives) with more than
    `max_bytes_pixels` pixels in their header are refused before they are decoded."""
    if isinstance(image, (str, Path)):
        return load_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        too_large = None
        try:
            with Image.open(io.BytesIO(bytes(image))) as img:
                width, height = img.size
                if max_bytes_pixels is not None and width * height > max_bytes_pixels:
                    too_large = f"{width}x{height} is {width * height / 1e6:.1f} megapixels"
                else:
                    img.load()
                    return rgb_of(upright(img), name)
        except _DECODE_ERRORS as err:
            raise ImageError(f"{name}: cannot decode image ({err})") from None
        raise ImageError(f"{name}: {too_large}, larger than the {max_bytes_pixels / 1e6:g} megapixel limit for encoded bytes (max_megapixels)")
    if isinstance(image, Image.Image):
        try:
            rgb = _pil_to_rgb(upright(image))
        except _DECODE_ERRORS as err:
            raise ImageError(f"{name}: cannot convert image mode {image.mode} to RGB ({err})") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"{name}: an array must be HxWx3 uint8, got {image.dtype} {image.shape}")
        rgb = np.ascontiguousarray(image)
    else:
        raise ImageError(f"{name}: expected a path, image bytes, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{name}: empty image {rgb.shape}")
    return rgb


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 HxWx3 image to size x size (bicubic; antialiased when shrinking)."""
    if img.shape[:2] == (size, size):
        return np.ascontiguousarray(img, dtype=np.uint8)
    resized = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool HxW mask to size x size (nearest neighbour keeps it binary)."""
    if mask.shape == (size, size):
        return np.asarray(mask, dtype=bool).copy()
    as_bytes = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(as_bytes.resize((size, size), Image.Resampling.NEAREST)) > 0
