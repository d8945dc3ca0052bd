"""DRAEM-style synthetic anomalies: Perlin masks, anomaly-source textures, blending.

Pure numpy/scipy, no I/O. Every function draws its randomness only from the
`numpy.random.Generator` it is given, so one seed reproduces the same images,
textures and masks.

A synthetic defect is a texture (a DTD image, or a procedural one when no
texture folder is configured) photometrically augmented, then blended into a
normal image inside a thresholded, rotated Perlin-noise mask:
`out = image * (1 - m) + (1 - beta) * texture * m + beta * image * m`.
beta is DRAEM's: the weight of the *image* inside the mask, drawn from
`beta_range` with an upper bound below 1 (DRAEM's code: U(0, 0.8)), so the
texture always keeps a share of at least 1 - beta_max.

Design choice: a mask is a label only where the image changed. A draw whose
mean absolute change inside the mask stays below `min_change` grey levels
(a texture that happens to look like the image) is redrawn from the next seed;
after REDRAWS such draws the image is returned unchanged with an empty mask, so
the row is a normal one. Training and the validation split that fits the
thresholds never see a "defect" that is not in the pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

REDRAWS = 16  # invisible draws are rare (a texture close to the image); after this many the row becomes normal
MASK_TRIES = 8  # resample the Perlin mask this often before falling back to an ellipse; empty draws are rare
AUGMENTATIONS_PER_TEXTURE = 3  # DRAEM applies 3 random augmenters to each anomaly source


def _check_shape(shape_hw, name: str) -> tuple[int, int]:
    if len(shape_hw) != 2 or min(int(shape_hw[0]), int(shape_hw[1])) < 1:
        raise ValueError(f"{name}: expected two positive sizes (H, W), got {shape_hw!r}")
    return int(shape_hw[0]), int(shape_hw[1])


def _check_rgb(array, name: str) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{name}: expected a uint8 HxWx3 array, got {got}")


# --------------------------------------------------------------------------- Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape_hw, res_hw, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient Perlin noise, float32 HxW in [-1, 1], with `res_hw` lattice cells per axis.

    Pixel coordinates are mapped to lattice coordinates `i * res / size`, so the
    lattice need not divide the image: this is the padded-grid-then-crop scheme
    with fractional cell sizes, computed directly for the pixels kept.
    """
    h, w = _check_shape(shape_hw, "shape_hw")
    ry, rx = _check_shape(res_hw, "res_hw")
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    grad_y, grad_x = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)

    def axis(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
        coord = np.arange(size, dtype=np.float64) * (cells / size)
        cell = np.minimum(np.floor(coord).astype(np.intp), cells - 1)
        return cell, (coord - cell).astype(np.float32)

    iy, fy = axis(h, ry)
    ix, fx = axis(w, rx)

    def corner(dy: int, dx: int) -> np.ndarray:
        rows, cols = np.ix_(iy + dy, ix + dx)
        return grad_y[rows, cols] * (fy - dy)[:, None] + grad_x[rows, cols] * (fx - dx)[None, :]

    ty, tx = _fade(fy)[:, None], _fade(fx)[None, :]
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + tx * (n01 - n00)
    bottom = n10 + tx * (n11 - n10)
    # sqrt(2) rescales the 2-D Perlin range [-sqrt(.5), sqrt(.5)] to [-1, 1]
    return (np.float32(np.sqrt(2.0)) * (top + ty * (bottom - top))).astype(np.float32)


def fractal_noise(shape_hw, base_res: int, octaves: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of Perlin octaves (lattice doubling, amplitude halving), float32 HxW min-max scaled to [0, 1]."""
    h, w = _check_shape(shape_hw, "shape_hw")
    total = np.zeros((h, w), np.float32)
    for octave in range(octaves):
        res = base_res * 2**octave
        total += perlin_noise((h, w), (res, res), rng) * np.float32(0.5**octave)
    low, high = float(total.min()), float(total.max())
    return (total - low) / (high - low) if high > low else np.zeros_like(total)


def _random_ellipse(shape_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = shape_hw
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ay, ax = rng.uniform(max(h, 2) / 16, max(h, 2) / 5), rng.uniform(max(w, 2) / 16, max(w, 2) / 5)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    mask = (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
    mask[min(int(cy), h - 1), min(int(cx), w - 1)] = True  # at least one pixel, even for tiny images
    return mask


def perlin_mask(shape_hw, rng: np.random.Generator, scale_max: int = 6, threshold: float = 0.5) -> np.ndarray:
    """Non-empty bool HxW anomaly mask: rotated Perlin noise above `threshold` (DRAEM).

    The lattice has 2**k cells per axis, k drawn independently per axis from
    [0, scale_max). An empty draw is resampled up to MASK_TRIES times, then a
    random ellipse is used, so every synthetic image carries a defect.
    """
    h, w = _check_shape(shape_hw, "shape_hw")
    if scale_max < 1:
        raise ValueError(f"scale_max: must be >= 1, got {scale_max}")
    for _ in range(MASK_TRIES):
        res = (2 ** int(rng.integers(0, scale_max)), 2 ** int(rng.integers(0, scale_max)))
        noise = perlin_noise((h, w), res, rng)
        noise = ndimage.rotate(noise, rng.uniform(-90.0, 90.0), reshape=False, order=1, mode="reflect")
        mask = noise > threshold
        if mask.any():
            return mask
    return _random_ellipse((h, w), rng)


# --------------------------------------------------------------------------- anomaly-source textures


def _rotated_coords(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)


def _field_perlin(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return fractal_noise((h, w), int(rng.integers(1, 9)), int(rng.integers(2, 6)), rng)


def _field_stripes(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    u, _ = _rotated_coords(h, w, rng)
    period = rng.uniform(3.0, max(4.0, min(h, w) / 4))
    warp = perlin_noise((h, w), (2, 2), rng) * rng.uniform(0.0, period)  # wavy, not ruler-straight
    wave = np.sin(2 * np.pi * (u + warp) / period + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.5:
        wave = np.sign(wave)
    return (0.5 + 0.5 * wave).astype(np.float32)


def _field_checker(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated_coords(h, w, rng)
    cell = rng.uniform(3.0, max(4.0, min(h, w) / 6))
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _field_speckle(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    dots = (rng.random((h, w)) < rng.uniform(0.01, 0.3)).astype(np.float32)
    dots = ndimage.gaussian_filter(dots, rng.uniform(0.0, 2.5))
    base = _field_perlin(h, w, rng) * rng.uniform(0.0, 0.7)
    total = dots + base
    return (total - total.min()) / max(float(np.ptp(total)), 1e-6)


_FIELDS = (_field_perlin, _field_stripes, _field_checker, _field_speckle)


def procedural_texture(shape_hw, rng: np.random.Generator) -> np.ndarray:
    """A uint8 HxWx3 anomaly-source texture made from nothing but `rng`.

    One of coloured fractal Perlin noise, (wavy) stripes, a rotated checker or
    speckle, mapped through a random 2-4 colour palette, with grain and
    per-channel colour jitter; stands in for DTD when no texture folder is set.
    """
    h, w = _check_shape(shape_hw, "shape_hw")
    field_fn = _FIELDS[int(rng.integers(len(_FIELDS)))]
    t = field_fn(h, w, rng)
    n_colours = int(rng.integers(2, 5))
    palette = rng.uniform(0, 255, size=(n_colours, 3))
    stops = np.linspace(0.0, 1.0, n_colours)
    rgb = np.stack([np.interp(t, stops, palette[:, c]) for c in range(3)], axis=-1).astype(np.float32)
    rgb += rng.normal(0.0, rng.uniform(0.0, 12.0), size=rgb.shape).astype(np.float32)
    rgb = rgb * rng.uniform(0.8, 1.2, size=3).astype(np.float32) + rng.uniform(-20, 20, size=3).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- photometric augmentation


def _aug_gamma(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0, size=3).astype(np.float32)  # per channel, as DRAEM's GammaContrast
    return 255.0 * (x / 255.0) ** gamma


def _aug_brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)


def _aug_hue(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate colours about the grey axis (a hue shift), then maybe shuffle channels."""
    angle = rng.uniform(-np.pi, np.pi)
    cos, sin, third = np.cos(angle), np.sin(angle), 1.0 / 3.0
    k = np.sqrt(third) * sin
    rotation = np.full((3, 3), third * (1 - cos))
    rotation[np.diag_indices(3)] += cos
    rotation += np.array([[0, -k, k], [k, 0, -k], [-k, k, 0]])
    out = x @ rotation.T.astype(np.float32)
    return out[..., rng.permutation(3)] if rng.random() < 0.5 else out


def _aug_solarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold = rng.uniform(32, 128)
    return np.where(x >= threshold, 255.0 - x, x)


def _aug_posterize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keep_bits = int(rng.integers(1, 5))
    step = 2 ** (8 - keep_bits)
    return np.floor(np.clip(x, 0, 255) / step) * step


def _aug_invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - x


def _aug_autocontrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low, high = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    return (x - low) * (255.0 / np.maximum(high - low, 1.0))


def _aug_equalize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(x)
    levels = np.clip(np.rint(x), 0, 255).astype(np.intp)
    for c in range(3):
        cdf = np.cumsum(np.bincount(levels[..., c].ravel(), minlength=256)).astype(np.float32)
        cdf_min = cdf[cdf > 0][0]
        lut = (cdf - cdf_min) * (255.0 / max(cdf[-1] - cdf_min, 1.0))
        out[..., c] = np.clip(lut, 0, 255)[levels[..., c]]
    return out


def _aug_sharpen(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = ndimage.gaussian_filter(x, sigma=(1.0, 1.0, 0.0))
    return x + rng.uniform(0.5, 2.0) * (x - blurred)


def _aug_rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.rotate(x, rng.uniform(-45, 45), axes=(0, 1), reshape=False, order=1, mode="reflect")


_AUGMENTATIONS = (
    _aug_gamma,
    _aug_brightness,
    _aug_hue,
    _aug_solarize,
    _aug_posterize,
    _aug_invert,
    _aug_autocontrast,
    _aug_equalize,
    _aug_sharpen,
    _aug_rotate,
)


def augment_texture(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply AUGMENTATIONS_PER_TEXTURE distinct random photometric/geometric augmentations (DRAEM); uint8 out."""
    _check_rgb(texture, "texture")
    x = texture.astype(np.float32)
    for index in rng.choice(len(_AUGMENTATIONS), AUGMENTATIONS_PER_TEXTURE, replace=False):
        x = np.clip(_AUGMENTATIONS[int(index)](x, rng), 0, 255).astype(np.float32)
    return np.rint(x).astype(np.uint8)


# --------------------------------------------------------------------------- blending


def resize_rgb(image: np.ndarray, shape_hw) -> np.ndarray:
    """Bilinear resize of a uint8 HxWx3 array to `shape_hw` (no-op when the size already matches)."""
    h, w = _check_shape(shape_hw, "shape_hw")
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def synthesize_anomaly(
    image: np.ndarray,
    texture: np.ndarray,
    rng: np.random.Generator,
    beta_range: tuple[float, float],
    scale_max: int,
    threshold: float,
    augment: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend `texture` into `image` inside a Perlin mask; returns (uint8 HxWx3 image, bool HxW mask).

    `texture` (any size) is resized to the image and, with `augment`, passed
    through `augment_texture` as DRAEM does. beta ~ U(beta_range) weighs the
    original image inside the mask, 1 - beta the texture; pixels outside it are
    untouched. beta_range must lie in [0, 1): the texture never vanishes.
    """
    _check_rgb(image, "image")
    _check_rgb(texture, "texture")
    low, high = float(beta_range[0]), float(beta_range[1])
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"beta_range: expected 0 <= low <= high < 1 (the texture must keep a share), got {beta_range!r}")
    h, w = image.shape[:2]
    source = resize_rgb(texture, (h, w))
    if augment:
        source = augment_texture(source, rng)
    mask = perlin_mask((h, w), rng, scale_max=scale_max, threshold=threshold)
    beta = np.float32(rng.uniform(low, high))
    blended = (np.float32(1.0) - beta) * source.astype(np.float32) + beta * image.astype(np.float32)
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], blended, image), mask


def visible_change(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change in grey levels (over mask pixels and channels); 0 for an empty mask."""
    if not mask.any():
        return 0.0
    return float(np.abs(out.astype(np.int16) - image.astype(np.int16))[mask].mean())


def synthesize_visible(
    image: np.ndarray,
    texture_for: Callable[[np.random.Generator], np.ndarray],
    seed: Sequence[int],
    beta_range: tuple[float, float],
    scale_max: int,
    threshold: float,
    min_change: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic anomaly that changes the image by at least `min_change` inside its mask.

    Draw `attempt` uses `np.random.default_rng([*seed, attempt])` for both the texture (`texture_for`)
    and the blend, so the result is a pure function of `seed`. Returns (image, empty mask) when no
    draw is visible: the caller labels that row normal.
    """
    for attempt in range(REDRAWS):
        rng = np.random.default_rng([*seed, attempt])
        out, mask = synthesize_anomaly(image, texture_for(rng), rng, beta_range, scale_max, threshold)
        if visible_change(image, out, mask) >= min_change:
            return out, mask
    return image.copy(), np.zeros(image.shape[:2], dtype=bool)
