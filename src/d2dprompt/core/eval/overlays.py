"""Pictures of one prediction, pure numpy/PIL: the three-panel page predict writes, the overlay at the image's own
size that the Python API and the web app show, and masks at the image's own size."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from d2dprompt.core.eval.report import jet, scaled

MIN_PANEL = 256  # panels are upscaled to at least this side, so small map sizes stay readable


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` broken into lines that fit `width` pixels (at spaces; a long path is cut at any character)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while draw.textlength(line, font=font) > width and len(line) > 1:  # one word wider than the page
                cut = max(1, int(len(line) * width / draw.textlength(line, font=font)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def render_overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, title: str, display: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """image | anomaly map | overlay (map blended at 50 %, predicted mask outlined in white), all map_size wide.

    The map is coloured on `display`, the range evaluate recorded in thresholds.json for this run (its grids
    use the same), with a colour bar; [0, 1] without a thresholds file. The title wraps to the page width.
    """
    heat = jet(scaled(amap, display))
    blend = np.asarray(overlay_at_size(image, amap, mask, display))
    size, gap, line_h, bar_h = max(amap.shape[0], MIN_PANEL), 4, 14, 10
    width = 3 * size + 2 * gap
    font = ImageFont.load_default(size=11)
    lines = _wrapped(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, font, width - 4)
    header = 4 + line_h * (len(lines) + 1)  # the title's lines, then the panel labels
    canvas = Image.new("RGB", (width, header + size + bar_h + 2 * line_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((2, 2 + k * line_h), line, fill="black", font=font)
    for i, (panel, label) in enumerate(((image, "image"), (heat, "anomaly map"), (blend, "overlay + predicted mask"))):
        x = i * (size + gap)
        canvas.paste(Image.fromarray(panel).resize((size, size), Image.Resampling.NEAREST), (x, header))
        draw.text((x + 2, header - line_h), label, fill="black", font=font)
    ramp = jet(np.linspace(0, 1, size))[None].repeat(bar_h, axis=0)  # the colour bar under the map panel
    canvas.paste(Image.fromarray(ramp), (size + gap, header + size + 3))
    for value, anchor_x, align in ((display[0], size + gap, "la"), (display[1], 2 * size + gap, "ra")):
        draw.text((anchor_x, header + size + bar_h + 5), f"{value:.3g}", fill="black", font=font, anchor=align)
    return canvas


def mask_at_size(mask: np.ndarray, hw: tuple[int, int]) -> Image.Image:
    """bool map-size mask -> 0/255 greyscale PNG image at (H, W), nearest neighbour."""
    small = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return small if small.size == (hw[1], hw[0]) else small.resize((hw[1], hw[0]), Image.Resampling.NEAREST)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's 2-pixel inner border: drawn in white over the overlay so the heat under the mask stays visible."""
    return mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)


def overlay_at_size(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, display: tuple[float, float]) -> Image.Image:
    """The image with its anomaly map blended at 50 % (coloured on `display`) and the predicted mask outlined,
    all at the image's own size (`amap` and `mask` already resized to it)."""
    heat = jet(scaled(amap, display))
    blend = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32)).astype(np.uint8)
    blend[outline(mask)] = 255
    return Image.fromarray(blend)
