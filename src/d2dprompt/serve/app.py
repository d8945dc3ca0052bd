"""python -m d2dprompt.serve.app [--runs stages/train] [--samples sample] [--host 127.0.0.1] [--port 7860] [--params params.yaml]

A local web page (Gradio) around the Python API (detector.Detector): pick a trained run, upload one or several
images or pick sample images, and see each one's score, label, anomaly-map overlay and predicted mask side by side.
The image and pixel threshold sliders start at the run's thresholds (evaluate's thresholds.json when there is one)
and re-decide label and mask from the maps already computed; the mask (PNG) and the results (JSON) download.
Files that are not images, larger than --max-mb or --max-side, or smaller than the model's input side are named
in the page with the reason; the others are scored. It binds to 127.0.0.1 unless --host says otherwise, and works
offline: Gradio serves its own front-end files, analytics are off and the page uses the system's fonts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer

from d2dprompt.core.runtime.cli import app_for

SAMPLE_GLOB = "*/test/*/*.png"  # the bundled sample's test images, defective and good
SCORE_DIGITS = 6  # scores shown with this many decimals: enough to compare with the API's float
SLIDER_STEP = 1e-6  # fine enough that a slider holds a fitted threshold as shown (SCORE_DIGITS)


def find_runs(runs: Path) -> dict[str, Path]:
    """name -> trained folder: `runs` itself when it holds model.json, else each of its run folders."""
    if (runs / "model.json").is_file():
        return {runs.name: runs}
    found = {p.parent.name: p.parent for p in sorted(runs.glob("*/model.json"))}
    if not found:
        raise FileNotFoundError(f"{runs}: no trained run here (a folder with model.json); run `make repro` or `dvc repro` first")
    return found


def check_upload(path: Path, max_mb: float, max_side: int, name: str):
    """The image's pixels, or an ImageError naming `name` and why: not an image, too many bytes or pixels."""
    from PIL import Image

    from d2dprompt.core.data.images import ImageError, load_rgb

    size_mb = path.stat().st_size / 2**20
    if size_mb > max_mb:
        raise ImageError(f"{name}: {size_mb:.1f} MB, larger than the {max_mb:g} MB limit (--max-mb)")
    try:
        with Image.open(path) as probe:  # reads the header only: a huge image is refused before it is decoded
            width, height = probe.size
    except Exception:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    if max(width, height) > max_side:
        raise ImageError(f"{name}: {width}x{height}, larger than the {max_side} px limit (--max-side)")
    try:
        return load_rgb(path)
    except ImageError as err:
        raise ImageError(f"{name}: {str(err).split(': ', 1)[-1]}") from None


def verdict_line(name: str, result) -> str:
    t = result.thresholds
    decision = "**anomalous**" if result.label else "**normal**"
    return (f"`{name}`: score <span id='score-value'>{result.score:.{SCORE_DIGITS}f}</span> vs image threshold "
            f"{t.image:.{SCORE_DIGITS}f} → {decision}; <span id='mask-pixels'>{int(result.mask.sum())}</span> anomalous "
            f"pixels at pixel threshold {t.pixel:.{SCORE_DIGITS}f} (thresholds: {t.source})")


def decided(det, results: list, image_t: float, pixel_t: float) -> list:
    """The scored `results` (at the run's thresholds) decided at the sliders'; a slider within SLIDER_STEP of the
    run's threshold keeps it exactly, and with it the threshold's source."""
    t = det.thresholds
    image = t.image if abs(image_t - t.image) <= SLIDER_STEP else image_t
    pixel = t.pixel if abs(pixel_t - t.pixel) <= SLIDER_STEP else pixel_t
    return [r.with_thresholds(image, pixel) for r in results]


def results_json(names: list[str], results: list) -> dict:
    return {"images": [{"image": name, **r.summary()} for name, r in zip(names, results)]}


def build_page(runs: dict[str, Path], samples: Path | None, params: Path | None, max_mb: float, max_side: int, scratch: Path):
    """The Gradio Blocks page; detectors load on first use and stay loaded."""
    import gradio as gr

    from d2dprompt.serve.detector import Detector, check_size
    from d2dprompt.core.data.images import ImageError

    detectors: dict[tuple[str, str | None], Detector] = {}
    sample_images = sorted(p.relative_to(samples).as_posix() for p in samples.glob(SAMPLE_GLOB)) if samples and samples.is_dir() else []

    def detector_for(run: str, category: str | None) -> Detector:
        key = (run, category or None)
        if key not in detectors:
            base = detectors.get((run, None)) or Detector.load(runs[run], params=params)
            detectors[(run, None)] = base
            detectors[key] = base.for_category(category) if category else base
        return detectors[key]

    def slider_range(det: Detector) -> tuple[float, float]:
        t = det.thresholds
        return min(0.0, det.display[0], t.image, t.pixel), max(1.0, det.display[1], t.image, t.pixel)

    def choose_run(run: str):
        det = detector_for(run, None)
        low, high = slider_range(det)
        many = len(det.categories) > 1
        info = f"**{det.method}** run `{runs[run]}`, input side {det.image_size} px; thresholds: {det.thresholds.source}"
        return (
            gr.update(choices=det.categories, value=det.categories[0] if many else None, visible=many),
            gr.update(minimum=low, maximum=high, value=det.thresholds.image),
            gr.update(minimum=low, maximum=high, value=det.thresholds.pixel),
            info,
        )

    def view(names: list[str], results: list, shown: str | None):
        if not results:
            return "", None, None, None, None, None
        index = names.index(shown) if shown in names else 0
        result, name = results[index], names[index]
        mask_path = scratch / f"{Path(name).stem}_mask.png"
        result.mask_image.save(mask_path)
        json_path = scratch / "results.json"
        json_path.write_text(json.dumps(results_json(names, results), indent=2))
        return verdict_line(name, result), result.image, result.overlay, result.mask_image, str(mask_path), str(json_path)

    def table(names: list[str], results: list):
        return [[name, round(r.score, SCORE_DIGITS), "anomalous" if r.label else "normal", int(r.mask.sum())] for name, r in zip(names, results)]

    def detect(run, category, uploads, picked, image_t, pixel_t):
        det = detector_for(run, category)
        items = [(Path(u).name, Path(u)) for u in (uploads or [])] + [(p, samples / p) for p in (picked or [])]
        if not items:
            return [], [], "Upload images or pick sample images first.", [], gr.update(choices=[], value=None), *view([], [], None)
        names, arrays, problems = [], [], []
        for name, path in items:
            try:
                arrays.append(check_size(name, check_upload(path, max_mb, max_side, name), det.image_size))
                names.append(name)
            except ImageError as err:
                problems.append(f"- {err}")
        scored, step = [], det.cfg.evaluate.batch_size
        for start in range(0, len(arrays), step):
            scored += det.predict_arrays(arrays[start : start + step])
        message = ("**Not scored:**\n" + "\n".join(problems)) if problems else ""
        shown = names[0] if names else None
        results = decided(det, scored, image_t, pixel_t)
        return names, scored, message, table(names, results), gr.update(choices=names, value=shown), *view(names, results, shown)

    def redraw(run, category, names, scored, shown, image_t, pixel_t):
        results = decided(detector_for(run, category), scored, image_t, pixel_t)  # the maps stay; label and mask change
        return table(names, results), *view(names, results, shown)

    with gr.Blocks(title="D2D-Prompt detector") as page:
        gr.Markdown("# D2D-Prompt detector\nScore images with a trained run; the threshold sliders re-decide label and mask without recomputing the maps.")
        names_state, scored_state = gr.State([]), gr.State([])  # this browser session's images and their predictions
        with gr.Row():
            run = gr.Dropdown(list(runs), value=next(iter(runs)), label="trained run", elem_id="run")
            category = gr.Dropdown([], label="category (draem, decodiff)", visible=False, elem_id="category")
        run_info = gr.Markdown(elem_id="run-info")
        with gr.Row():
            uploads = gr.File(file_count="multiple", label="upload images", elem_id="uploads")
            picked = gr.Dropdown(sample_images, multiselect=True, label="or pick sample images", elem_id="samples")
        detect_button = gr.Button("Detect", variant="primary", elem_id="detect")
        problems = gr.Markdown(elem_id="problems")
        with gr.Row():
            image_t = gr.Slider(0, 1, 0.5, step=SLIDER_STEP, label="image threshold", elem_id="image-threshold")
            pixel_t = gr.Slider(0, 1, 0.5, step=SLIDER_STEP, label="pixel threshold", elem_id="pixel-threshold")
        results_table = gr.Dataframe(headers=["image", "score", "label", "anomalous pixels"], interactive=False, elem_id="results")
        shown = gr.Dropdown([], label="show", elem_id="shown")
        verdict = gr.Markdown(elem_id="verdict")
        with gr.Row():
            original = gr.Image(label="image", elem_id="image", interactive=False)
            overlay = gr.Image(label="anomaly map overlay", elem_id="overlay", interactive=False)
            mask = gr.Image(label="predicted mask", elem_id="mask", interactive=False, image_mode="L")
        with gr.Row():
            mask_file = gr.File(label="mask (PNG)", elem_id="mask-file")
            json_file = gr.File(label="results (JSON)", elem_id="json-file")

        shown_outputs = [verdict, original, overlay, mask, mask_file, json_file]
        page.load(choose_run, run, [category, image_t, pixel_t, run_info])
        run.change(choose_run, run, [category, image_t, pixel_t, run_info])
        detect_button.click(detect, [run, category, uploads, picked, image_t, pixel_t],
                            [names_state, scored_state, problems, results_table, shown, *shown_outputs])
        redraw_inputs = [run, category, names_state, scored_state, shown, image_t, pixel_t]
        for slider in (image_t, pixel_t):
            slider.input(redraw, redraw_inputs, [results_table, *shown_outputs], trigger_mode="always_last")
        shown.input(redraw, redraw_inputs, [results_table, *shown_outputs])
    return page


def main(
    runs: Path = typer.Option(Path("stages/train"), help="a train@<method> output, or the folder holding them"),
    samples: Path = typer.Option(Path("sample"), help="an MVTec-layout folder whose test images the page offers"),
    params: Path | None = typer.Option(None, help="params file [default: ./params.yaml when present, else the settings the thresholds were fitted with]"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 serves other machines too"),
    port: int = typer.Option(7860, min=1, max=65535, help="port to serve on"),
    max_mb: float = typer.Option(20.0, min=0.01, help="largest upload accepted, in MB"),
    max_side: int = typer.Option(8192, min=1, help="largest image side accepted, in pixels"),
) -> None:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check: before gradio is imported
    try:
        found = find_runs(runs)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    scratch = Path(tempfile.mkdtemp(prefix="d2dprompt-app-"))  # the downloads the page offers
    page = build_page(found, samples, params, max_mb, max_side, scratch)
    typer.echo(f"D2D-Prompt detector: http://{host}:{port}/  ({len(found)} run{'s' if len(found) > 1 else ''} from {runs}; Ctrl+C stops)")
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # system fonts: no web-font fetch
    page.launch(server_name=host, server_port=port, allowed_paths=[str(scratch)], theme=theme, show_error=True, quiet=True)


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
