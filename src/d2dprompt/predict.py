"""python -m d2dprompt.predict IMAGE_OR_FOLDER [--trained stages/train/d2dprompt] [--out predictions] [--params params.yaml]
       [--thresholds stages/evaluate/<method>/<dataset>/thresholds.json] [--image-threshold X] [--pixel-threshold Y] [--batch-size N]

Runs a trained method (`--trained stages/train/<method>`) on one image or on every image under a folder (recursive,
sorted). Per image it writes `<out>/<relative stem>_overlay.png` (image | anomaly map | overlay with
the predicted mask outlined), `<out>/<relative stem>_mask.png` (0/255 at the image's original size)
and one JSON line in `<out>/predictions.jsonl`. Thresholds come from `--thresholds` (fitted on a
validation split by the evaluate stage), are overridden by `--image-threshold` / `--pixel-threshold`,
and otherwise fall back to `evaluate.sensitivity`; every line says which. Files that cannot be
predicted are skipped, named on stderr and listed in `<out>/errors.txt` with the reason: unreadable
images, files under the folder without an image suffix, and images with a side shorter than the
model's input side (`model.image_size` of the trained run; upscaling would invent the detail
the model judges). The exit status is 1 only when no image could be predicted. Outside a checkout
(no params.yaml where it runs) the trained folder and its thresholds.json are enough: the map scale comes
from the thresholds file, the rest from the defaults.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm import tqdm

from d2dprompt.config import EvaluateParams, Params, ParamsError, load_params, params_from_dict
from d2dprompt.cli import app_for
from d2dprompt.images import ImageError, load_rgb, resize_rgb
from d2dprompt.outputs import atomic_file
from d2dprompt.report import jet, scaled
from d2dprompt.thresholds import Thresholds, binary_masks

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # what Pillow decodes and datasets ship
FALLBACK_SOURCE = "fixed sensitivity"
# Threshold-file keys that change the scale thresholds live on: a file fitted under other settings is refused.
SCALE_KEYS = ("score", "map_size", "sigma", "top_percent")
MIN_PANEL = 256  # overlay panels are upscaled to at least this side, so small map sizes stay readable
PREDICTIONS_FILE, ERRORS_FILE = "predictions.jsonl", "errors.txt"


class ThresholdsError(ValueError):
    """A thresholds file that is missing, malformed, or fitted under other evaluate settings."""


@dataclass(frozen=True)
class InputImage:
    path: Path
    key: str  # path relative to the input root (posix): the output stem


def read_thresholds_file(path: Path, ev: EvaluateParams, method: str = "d2dprompt") -> dict:
    if not path.is_file():
        raise ThresholdsError(f"{path}: thresholds file not found")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ThresholdsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ThresholdsError(f"{path}: expected a JSON object with 'image' and 'pixel'")
    for key in ("image", "pixel"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ThresholdsError(f"{path}: key '{key}' must be a finite number, got {value!r}")
    if record.get("method", method) != method:
        raise ThresholdsError(f"{path}: fitted for method {record['method']!r}, not for the {method!r} run predicting")
    from d2dprompt.inference import image_score_name

    for key in SCALE_KEYS:
        expected = image_score_name(method, ev.score) if key == "score" else getattr(ev, key)
        if key in record and record[key] != expected:
            raise ThresholdsError(f"{path}: fitted with {key}={record[key]!r} but evaluate.{key}={expected!r}")
    return record


def resolve_thresholds(
    file: Path | None, image: float | None, pixel: float | None, ev: EvaluateParams, method: str = "d2dprompt"
) -> Thresholds:
    """Explicit values beat the file, the file beats `evaluate.sensitivity`."""
    values = {"image": ev.sensitivity, "pixel": ev.sensitivity}
    origins = {"image": FALLBACK_SOURCE, "pixel": FALLBACK_SOURCE}
    if file is not None:
        record = read_thresholds_file(file, ev, method)
        fitted = f"{file} ({record['source']})" if record.get("source") else str(file)
        for key in values:
            values[key], origins[key] = float(record[key]), fitted
    for key, override in (("image", image), ("pixel", pixel)):
        if override is not None:
            if not math.isfinite(override):
                raise ThresholdsError(f"--{key}-threshold: must be a finite number, got {override}")
            values[key], origins[key] = float(override), f"--{key}-threshold"
    if origins["image"] == origins["pixel"]:
        source = origins["image"]
    else:
        source = f"image: {origins['image']}; pixel: {origins['pixel']}"
    return Thresholds(values["image"], values["pixel"], source)


def find_inputs(target: Path, exclude: Path | None = None) -> tuple[list[InputImage], list[str]]:
    """(images, skipped): one file, or every image-suffixed file under a folder (sorted), and one
    `<path>: <reason>` line per other file there; anything under `exclude` is left out of both.
    """
    if target.is_file():
        return [InputImage(target, target.name)], []
    if not target.is_dir():
        raise FileNotFoundError(f"{target}: no such file or folder")
    skip = exclude.resolve() if exclude is not None else None
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    found, skipped = [], []
    for path in sorted(target.rglob("*")):
        if not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue  # our own outputs, when --out lies inside the input folder
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f"{path}: not an image file (suffix '{path.suffix}'; predict reads {suffixes})")
            continue
        found.append(InputImage(path, path.relative_to(target).as_posix()))
    if not found:
        others = f"; {len(skipped)} other file{'s' if len(skipped) > 1 else ''} skipped" if skipped else ""
        raise FileNotFoundError(f"{target}: no images ({suffixes}) under this folder{others}")
    return found, skipped


def find_images(target: Path, exclude: Path | None = None) -> list[InputImage]:
    """The images of `find_inputs`."""
    return find_inputs(target, exclude)[0]


def check_size(path: Path, image: np.ndarray, image_size: int) -> np.ndarray:
    """Refuse an image with a side shorter than the model's input side: upscaling invents its detail."""
    height, width = image.shape[:2]
    if min(height, width) < image_size:
        raise ImageError(
            f"{path}: image is {width}x{height}, smaller than the model's input side {image_size} "
            "(the input size of the trained run)"
        )
    return image


def output_stems(keys: list[str]) -> dict[str, str]:
    """key -> output stem: the key without its suffix, or the whole key where two images share a stem."""
    stems = {key: key.rsplit(".", 1)[0] if "." in Path(key).name else key for key in keys}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {key: stem if counts[stem] == 1 else key for key, stem in stems.items()}


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
    blend = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32)).astype(np.uint8)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)
    blend[edge] = 255
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


def save_png(image: Image.Image, dest: Path) -> None:
    with atomic_file(dest) as tmp:
        image.save(tmp, format="PNG")


def predict_images(
    score_images: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
    image_size: int,
    inputs: list[InputImage],
    out: Path,
    thresholds: Thresholds,
    ev: EvaluateParams,
    batch_size: int,
    skipped: list[str],
    progress: bool = True,
    display: tuple[float, float] = (0.0, 1.0),
) -> tuple[list[dict], list[str]]:
    """`score_images` is inference.image_scorer's: images at `image_size` -> (maps, scores).

    Writes the per-image files, `predictions.jsonl` and `errors.txt` (the `skipped` lines of
    `find_inputs` plus every image that could not be predicted, in path order); returns (the
    prediction records, the error lines).
    """
    stems = output_stems([item.key for item in inputs])
    for line in skipped:
        typer.echo(f"skipped: {line}", err=True)
    errors: list[str] = []
    records: list[dict] = []
    bar = tqdm(total=len(inputs), desc="predict", unit="img", disable=not progress)
    with atomic_file(out / PREDICTIONS_FILE) as tmp_jsonl, tmp_jsonl.open("w") as jsonl:
        for start in range(0, len(inputs), batch_size):
            batch, originals = [], []
            for item in inputs[start : start + batch_size]:
                try:
                    originals.append(check_size(item.path, load_rgb(item.path), image_size))
                    batch.append(item)
                except ImageError as err:
                    errors.append(str(err))
                    tqdm.write(f"skipped: {err}", file=sys.stderr)
            if batch:
                resized = [resize_rgb(img, image_size) for img in originals]
                maps, scores = score_images(resized)
                masks = binary_masks(maps, thresholds.pixel, opening_kernel=ev.opening_kernel, min_area=ev.min_area)
                for item, original, amap, mask, score in zip(batch, originals, maps, masks, scores.tolist()):
                    label = int(score >= thresholds.image)
                    mask_path = out / f"{stems[item.key]}_mask.png"
                    overlay_path = out / f"{stems[item.key]}_overlay.png"
                    save_png(mask_at_size(mask, original.shape[:2]), mask_path)
                    verdict = "anomalous" if label else "normal"
                    title = f"{item.key}   score {score:.4f} vs {thresholds.image:.4f} -> {verdict}\nthresholds: {thresholds.source}"
                    save_png(render_overlay(resize_rgb(original, ev.map_size), amap, mask, title, display), overlay_path)
                    record = {
                        "image": str(item.path),
                        "key": item.key,
                        "score": score,
                        "label": label,
                        "image_threshold": thresholds.image,
                        "pixel_threshold": thresholds.pixel,
                        "threshold_source": thresholds.source,
                        "mask": str(mask_path),
                        "overlay": str(overlay_path),
                    }
                    jsonl.write(json.dumps(record) + "\n")
                    records.append(record)
            bar.update(len(inputs[start : start + batch_size]))
    bar.close()
    errors = sorted(skipped + errors)
    with atomic_file(out / ERRORS_FILE) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in errors))
    return records, errors


def display_of(thresholds: Path | None) -> tuple[float, float]:
    """The colour range evaluate recorded beside the thresholds (its grids use it); [0, 1] without one."""
    if thresholds is None:
        return (0.0, 1.0)
    low, high = json.loads(thresholds.read_text()).get("display_range", [0.0, 1.0])  # resolve_thresholds read it already
    return (float(low), float(high)) if high > low else (0.0, 1.0)


def settings(params: Path | None, thresholds: Path | None, trained: Path) -> Params:
    """params.yaml when given or present here; elsewhere (a trained folder copied to another machine) the
    defaults, with the map scale and image score that `thresholds` was fitted on, and the trained run's own
    loss.image_top_percent, so a score here is the score evaluate gave."""
    if params is not None or Path("params.yaml").is_file():
        return load_params(params or Path("params.yaml"))  # checked before any model or record is read
    from d2dprompt.prompt_files import read_record

    record = read_record(trained)[0]
    raw: dict = {"evaluate": {}}
    if thresholds is not None and thresholds.is_file():
        try:
            fitted = json.loads(thresholds.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ThresholdsError(f"{thresholds}: not valid JSON ({err})") from None
        raw["evaluate"] = {k: fitted[k] for k in SCALE_KEYS if k in fitted and not (k == "score" and fitted[k] == record.get("method"))}
    if "loss" in record:
        raw["loss"] = {"image_top_percent": record["loss"]["image_top_percent"]}
    typer.echo(f"no params.yaml here: default settings{f', map scale from {thresholds}' if thresholds else ''}", err=True)
    try:
        return params_from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{thresholds}: {err}") from None


def main(
    target: Path = typer.Argument(..., help="an image, or a folder searched recursively for images"),
    trained: Path = typer.Option(Path("stages/train/d2dprompt"), "--trained", "--prompts", help="a train@<method> output (model.json + model.safetensors)"),
    out: Path = typer.Option(Path("predictions"), help="where masks, overlays and predictions.jsonl go"),
    params: Path | None = typer.Option(None, help="params file (evaluate block, model.device) [default: ./params.yaml; "
                                        "outside a checkout: the defaults with the map scale --thresholds records]"),
    thresholds: Path | None = typer.Option(None, help="thresholds.json written by the evaluate stage"),
    image_threshold: float | None = typer.Option(None, help="overrides the image threshold"),
    pixel_threshold: float | None = typer.Option(None, help="overrides the pixel threshold"),
    batch_size: int | None = typer.Option(None, min=1, help="images per forward (default: evaluate.batch_size)"),
    category: str | None = typer.Option(None, help="draem (a model per category) and decodiff (a class label per category): which, as <dataset>/<category>"),
) -> None:
    from d2dprompt.inference import image_scorer, input_size  # torch and the models load here, not for --help
    from d2dprompt.models import pick_device
    from d2dprompt.prompt_files import load_trained, method_of, move_to, read_record

    try:
        inputs, skipped = find_inputs(target, exclude=out)
        cfg = settings(params, thresholds, trained)
        chosen = resolve_thresholds(thresholds, image_threshold, pixel_threshold, cfg.evaluate, method_of(read_record(trained)[0]))
        device = pick_device(cfg.model.device)
        model, record = load_trained(trained)
        move_to(model, record, device)
        score_images = image_scorer(model, record, cfg.evaluate, device, cfg.model.precision, cfg.loss.image_top_percent, category)
        records, errors = predict_images(
            score_images, input_size(record), inputs, out, chosen, cfg.evaluate, batch_size or cfg.evaluate.batch_size, skipped,
            progress=len(inputs) > 1, display=display_of(thresholds),
        )
    except (ParamsError, ThresholdsError, ImageError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    for record in records if len(inputs) == 1 else []:
        verdict = "anomalous" if record["label"] else "normal"
        typer.echo(f"{record['image']}: score {record['score']:.4f} vs {chosen.image:.4f} -> {verdict}; mask {record['mask']}")
    note = f", {len(errors)} skipped (listed in {out / ERRORS_FILE})" if errors else ""
    typer.echo(f"{len(records)} of {len(inputs)} images -> {out / PREDICTIONS_FILE}{note}; thresholds: {chosen.source}")
    if not records:
        typer.echo(f"error: {target}: no image could be predicted", err=True)
        raise typer.Exit(1)


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
