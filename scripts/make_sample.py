"""python scripts/make_sample.py --out sample

Writes the bundled sample dataset: small, procedural, seeded, in MVTec AD layout.

Three categories: `tile` and `weave` (textures, 128 px) and `disc` (an object on a
plain background, 160 px so that the pipeline's resizing is exercised). Each has
train/good, test/good and three defect types with 0/255 masks under ground_truth.
Every image is drawn by the numpy code below from its own seed, so normal images
differ from each other and defects vary in position, size and orientation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import typer
from PIL import Image
from scipy.ndimage import gaussian_filter

N_TRAIN = 16  # enough normal images to learn the texture, small enough to stay < 6 MB in all
N_TEST_GOOD = 5
N_PER_DEFECT = 4
NOISE_STD = 2.5  # sensor noise in grey levels; more makes PNGs incompressible (size budget)

CATEGORIES = {  # name -> (image side in px, defect types)
    "tile": (128, ["crack", "stain", "hole"]),
    "weave": (128, ["scratch", "hole", "color"]),
    "disc": (160, ["scratch", "spot", "stain"]),
}


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    return yy, xx


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient + sensor noise shared by every category."""
    side = img.shape[0]
    yy, xx = _grid(side)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.0, 0.08) * ((np.cos(angle) * xx + np.sin(angle) * yy) / side - 0.5)
    noise = rng.normal(0.0, NOISE_STD, img.shape[:2])[..., None]  # grey noise: cheaper to store than per channel
    return np.clip(img * light[..., None] + noise, 0, 255)


def draw_tile(side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ceramic tiles with grout lines; returns (image, region where defects may go)."""
    yy, xx = _grid(side)
    period = rng.uniform(30, 36)
    oy, ox = rng.uniform(0, period, 2)
    gy, gx = (yy + oy) % period, (xx + ox) % period
    grout = np.minimum(np.minimum(gy, period - gy), np.minimum(gx, period - gx)) < 2.0
    base = np.array([196, 170, 140]) + rng.normal(0, 4, 3)
    tile_id = ((yy + oy) // period) * 7 + (xx + ox) // period
    shade = 1.0 + 0.05 * np.sin(tile_id * 1.7 + rng.uniform(0, 6))
    speckle = gaussian_filter(rng.normal(0, 1, (side, side)), 1.5) * 12
    img = base * shade[..., None] + speckle[..., None]
    img[grout] = np.array([120, 112, 104]) + rng.normal(0, 3, 3)
    return _finish(img, rng), np.ones((side, side), bool)


def draw_weave(side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Plain-weave fabric: alternating over/under threads."""
    yy, xx = _grid(side)
    period = rng.uniform(7.5, 9.0)
    theta = rng.uniform(-0.15, 0.15)
    u = (np.cos(theta) * xx + np.sin(theta) * yy) / period + rng.uniform(0, 1)
    v = (-np.sin(theta) * xx + np.cos(theta) * yy) / period + rng.uniform(0, 1)
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    across = np.where(warp_on_top, np.sin(np.pi * (u % 1)), np.sin(np.pi * (v % 1)))
    base = np.array([70, 92, 140]) + rng.normal(0, 5, 3)
    img = base * (0.65 + 0.45 * across)[..., None]
    return _finish(img, rng), np.ones((side, side), bool)


def draw_disc(side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A machined metal disc with a centre bore on a plain background."""
    yy, xx = _grid(side)
    cy, cx = side / 2 + rng.uniform(-5, 5, 2)
    radius = side * rng.uniform(0.33, 0.38)
    r = np.hypot(yy - cy, xx - cx)
    phi = np.arctan2(yy - cy, xx - cx)
    edge = np.clip(radius - r + 0.5, 0, 1)  # 1 px anti-aliased rim
    bore = np.clip(r - radius * 0.22 + 0.5, 0, 1)
    rings = 0.06 * np.sin(r * 1.9 + rng.uniform(0, 6))  # turning marks
    sheen = 0.12 * np.cos(phi - rng.uniform(0, 2 * np.pi))
    metal = np.array([168, 170, 176]) * (1 + rings + sheen)[..., None]
    background = np.array([40, 44, 52]) + rng.normal(0, 3, 3)
    alpha = (edge * bore)[..., None]
    img = alpha * metal + (1 - alpha) * background
    allowed = (r < radius * 0.85) & (r > radius * 0.32)  # defects lie on the metal ring
    return _finish(img, rng), allowed


DRAW = {"tile": draw_tile, "weave": draw_weave, "disc": draw_disc}


def _segment_distance(yy, xx, p0, p1) -> np.ndarray:
    d = np.asarray(p1, float) - np.asarray(p0, float)
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _pick_centre(allowed: np.ndarray, rng: np.random.Generator, margin: int) -> np.ndarray:
    side = allowed.shape[0]
    inner = np.zeros_like(allowed)
    inner[margin : side - margin, margin : side - margin] = True
    ys, xs = np.nonzero(allowed & inner)
    i = rng.integers(len(ys))
    return np.array([ys[i], xs[i]], float)


def defect_alpha(kind: str, side: int, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft coverage in [0, 1] of one defect; its support (> 0.5) becomes the mask."""
    yy, xx = _grid(side)
    centre = _pick_centre(allowed, rng, margin=side // 6)
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5) * side
        half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
        dist = _segment_distance(yy, xx, centre - half, centre + half)
        return np.clip(rng.uniform(1.0, 2.0) - dist, 0, 1)
    if kind == "crack":
        dist = np.full((side, side), np.inf)
        point, heading = centre, rng.uniform(0, 2 * np.pi)
        for _ in range(rng.integers(5, 9)):
            heading += rng.normal(0, 0.6)
            step = rng.uniform(5, 10) * np.array([np.sin(heading), np.cos(heading)])
            dist = np.minimum(dist, _segment_distance(yy, xx, point, point + step))
            point = point + step
        return np.clip(1.6 - dist, 0, 1)
    if kind in ("hole", "spot"):
        a, b = rng.uniform(3, 9), rng.uniform(2.5, 6)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - centre[0], xx - centre[1]
        u, v = np.cos(theta) * dx + np.sin(theta) * dy, -np.sin(theta) * dx + np.cos(theta) * dy
        ellipse = np.hypot(u / a, v / b)
        return np.clip((1.0 - ellipse) * min(a, b) + 0.5, 0, 1)
    if kind in ("stain", "color"):
        radius = rng.uniform(8, 16)
        blob = gaussian_filter(rng.normal(0, 1, (side, side)), 3.0)
        blob = blob / (blob.std() + 1e-9) * 0.35
        falloff = 1.0 - np.hypot(yy - centre[0], xx - centre[1]) / radius
        return np.clip((falloff + blob) * 3.0, 0, 1) * allowed
    raise ValueError(f"unknown defect kind '{kind}'")


DEFECT_COLOUR = {  # what the defect looks like where alpha = 1: (rgb target, blend strength)
    "crack": ((45, 40, 38), 0.85),
    "scratch": ((235, 235, 225), 0.7),
    "hole": ((20, 18, 16), 0.9),
    "spot": ((60, 40, 30), 0.8),
    "stain": ((120, 85, 40), 0.55),
    "color": ((170, 60, 70), 0.6),
}


def apply_defect(img: np.ndarray, kind: str, allowed: np.ndarray, rng: np.random.Generator):
    side = img.shape[0]
    while True:  # a stain that landed mostly outside `allowed` may come out too small to see
        alpha = defect_alpha(kind, side, allowed, rng)
        mask = alpha > 0.5
        if mask.sum() >= 12:
            break
    colour, strength = DEFECT_COLOUR[kind]
    blend = (alpha * strength)[..., None]
    out = img * (1 - blend) + np.asarray(colour, float) * blend
    return out, mask


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=True)


def make_sample(out: Path, seed: int = 0) -> dict[str, int]:
    """Write the sample under `out` (replaced); returns file counts per kind."""
    counts = {"images": 0, "masks": 0}
    if out.exists():
        shutil.rmtree(out)
    for cat_index, (category, (side, defects)) in enumerate(CATEGORIES.items()):
        jobs = [("train", "good", i) for i in range(N_TRAIN)] + [("test", "good", i) for i in range(N_TEST_GOOD)]
        jobs += [("test", kind, i) for kind in defects for i in range(N_PER_DEFECT)]
        for job_index, (split, kind, i) in enumerate(jobs):
            rng = np.random.default_rng([seed, cat_index, job_index])
            img, allowed = DRAW[category](side, rng)
            name = f"{i:03d}"
            if kind != "good":
                img, mask = apply_defect(img, kind, allowed, rng)
                _save_png(mask.astype(np.uint8) * 255, out / category / "ground_truth" / kind / f"{name}_mask.png")
                counts["masks"] += 1
            _save_png(np.round(img).astype(np.uint8), out / category / split / kind / f"{name}.png")
            counts["images"] += 1
    (out / "README.md").write_text(README.format(seed=seed, **counts))
    return counts


README = """# D2D-Prompt sample dataset

A small procedural dataset in MVTec AD layout, bundled so the whole pipeline runs
without downloading anything. It is synthetic: no photographs, no third-party data.

| category | image size | defect types |
|----------|-----------:|--------------|
| tile     | 128 x 128  | crack, stain, hole |
| weave    | 128 x 128  | scratch, hole, color |
| disc     | 160 x 160  | scratch, spot, stain |

Per category: 16 `train/good`, 5 `test/good`, 4 images per defect type, and one
mask per defective image in `ground_truth/<defect>/<name>_mask.png` (uint8, 0 =
normal, 255 = defect, same size as the image). {images} images, {masks} masks in all.

Generated with seed {seed} by

    python scripts/make_sample.py --out sample

which draws every image with numpy from its own seed (textures, lighting, sensor
noise, defects of random position, size and orientation). Rerunning it writes
identical files.

Licence: MIT, the same as the D2D-Prompt project.
"""


def main(
    out: Path = typer.Option(Path("sample"), help="folder to (re)write"),
    seed: int = typer.Option(0, help="the whole sample is a pure function of this seed"),
) -> None:
    counts = make_sample(out, seed)
    typer.echo(f"{out}: {counts['images']} images, {counts['masks']} masks in {len(CATEGORIES)} categories")


if __name__ == "__main__":
    typer.run(main)
