"""python -m d2dprompt.serve.app [--runs stages/train] [--samples sample] [--host 127.0.0.1] [--port 7860] [--params params.yaml]

A local web page (Gradio) around the Python API (detector.Detector): pick a trained run (or an exported folder,
which onnxruntime scores without torch: --runs exported/d2dprompt), upload one or several
images or pick sample images, and see each one's score, label, anomaly-map overlay and predicted mask side by side.
The image and pixel threshold sliders start at the run's thresholds (evaluate's thresholds.json when there is one)
and re-decide label and mask from the maps already computed; the mask (PNG) and the results (JSON) download.

Strangers reach the code here, so every request is bounded (`Limits`): an upload larger than --max-mb is cut off
while it streams in and never stored; an image's pixel count is read from its header and refused above
--max-megapixels before anything is decoded (a decompression bomb is "too large", not "not an image"); accepted
images are decoded down to --work-side pixels on their longer side (a JPEG already while it decodes), so one
image's arrays stay a few MB; at most --max-images are scored per request and requests run one at a time. Every
upload is deleted from disk once scored or refused (identical uploads share one file: the requests still holding it
read its bytes kept in memory, RecentUploads); each request writes its downloads and shown images as files to a folder
of its own (the session's earlier one is deleted; a file already served is never rewritten); a session's results go
when its tab closes; and the scratch folder (uploads, Gradio's cache, downloads) is removed when the app stops
(Ctrl+C or SIGTERM). It binds to 127.0.0.1 unless --host says
otherwise, and works offline: Gradio serves its own front-end files, analytics are off and the page uses the
system's fonts.
"""

import json
import math
import os
import shutil
import signal
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import typer

from d2dprompt.core.runtime.cli import app_for
from d2dprompt.serve.uploads import (
    SWEEP_EVERY_S,
    UNCLAIMED_S,
    RecentUploads,
    UploadBudget,
    claimed_uploads,
    delete_uploads,
    remember_uploads,
    start_sweeper,
)

SAMPLE_GLOB = "*/test/*/*.png"  # the bundled sample's test images, defective and good
SCORE_DIGITS = 6  # scores shown with this many decimals: enough to compare with the API's float
SLIDER_STEP = 1e-6  # fine enough that a slider holds a fitted threshold as shown (SCORE_DIGITS)
# detect and redraw share one queue slot: each replaces the session's downloads folder, and a redraw running beside
# a detect could delete the folder whose files Gradio was still copying into its cache
ONE_AT_A_TIME = "score"
STATE_TTL_S = 1800  # a session's results are dropped 30 min after its last request, even if its tab stays open
PNG_LEVEL = 1  # the shown images' PNG compression: fast, since each request writes three of them
CACHE_SWEEP_S = (600, 1800)  # Gradio's cache: every 10 min, delete the files older than 30 min
# the slider boxes show SCORE_DIGITS decimals of a threshold that may be negative or above 1: "-12.345678"
PAGE_CSS = "#image-threshold input[type=number], #pixel-threshold input[type=number] { width: 12ch; min-width: 12ch; }"


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (the CLI options of the same names)."""

    max_mb: float  # bytes per upload: enforced while it streams in, so nothing larger is ever stored
    max_megapixels: float  # pixels per image, from its header before decoding: refuses decompression bombs
    max_side: int  # pixels on the longer side, from the header
    work_side: int  # longer side an accepted image is decoded down to: bounds the memory one image takes
    max_images: int  # images scored per request; the rest are named as not scored


def find_runs(runs: Path) -> dict[str, Path]:
    """name -> trained folder: `runs` itself when it holds model.json, else each of its run folders."""
    if (runs / "model.json").is_file():
        return {runs.name: runs}
    found = {p.parent.name: p.parent for p in sorted(runs.glob("*/model.json"))}
    if not found:
        from d2dprompt.serve.detector import in_progress

        raise FileNotFoundError(in_progress(runs) or f"{runs}: no trained run here (a folder with model.json); run `make repro` or `dvc repro` first")
    return found


def check_upload(path: Path, limits: Limits, name: str, min_side: int = 1):
    """(the image's pixels, decoded down to `limits.work_side` on its longer side but never below `min_side` on its
    shorter one; its (width, height) in the file), or an ImageError naming `name` and why: not an image, too many
    bytes or pixels."""
    from PIL import Image

    from d2dprompt.core.data.images import ImageError, load_rgb

    size_mb = path.stat().st_size / 2**20
    if size_mb > limits.max_mb:
        raise ImageError(f"{name}: {size_mb:.1f} MB, larger than the {limits.max_mb:g} MB limit (--max-mb)")
    try:
        with Image.open(path) as probe:  # reads the header only: a huge image is refused before it is decoded
            width, height = probe.size
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: more pixels than Pillow decodes safely, larger than the {limits.max_megapixels:g} megapixel limit (--max-megapixels)") from None
    except Exception:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    if width * height > limits.max_megapixels * 1e6:
        raise ImageError(f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, larger than the {limits.max_megapixels:g} megapixel limit (--max-megapixels)")
    if max(width, height) > limits.max_side:
        raise ImageError(f"{name}: {width}x{height}, larger than the {limits.max_side} px limit (--max-side)")
    long, short = max(width, height), min(width, height)
    scale = min(1.0, max(limits.work_side / long, min_side / short))  # the shorter side must still fit the model
    try:
        return load_rgb(path, max_side=math.ceil(long * scale) if scale < 1 else None), (width, height)
    except ImageError as err:
        raise ImageError(f"{name}: {str(err).split(': ', 1)[-1]}") from None


def verdict_line(name: str, result) -> str:
    t = result.thresholds
    decision = "**anomalous**" if result.label else "**normal**"
    normalized = result.normalized_score
    scaled = "" if normalized is None else f" (normalised: <span id='normalized-score'>{normalized:.{SCORE_DIGITS}f}</span> vs 0.5)"
    return (f"`{name}`: score <span id='score-value'>{result.score:.{SCORE_DIGITS}f}</span> vs image threshold "
            f"{t.image:.{SCORE_DIGITS}f}{scaled} → {decision}; <span id='mask-pixels'>{int(result.mask.sum())}</span> anomalous "
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


class Downloads:
    """Each request's downloads in a folder of its own under `root/<session>/`: concurrent requests never share a
    file, and a session keeps only its latest folder (Gradio has copied the earlier ones into its cache)."""

    def __init__(self, root: Path):
        self.root = root

    def fresh(self, session: str) -> Path:
        session_dir = self.root / (session or "no-session")
        for old in session_dir.glob("*"):
            shutil.rmtree(old, ignore_errors=True)
        folder = session_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def forget(self, session: str) -> None:
        shutil.rmtree(self.root / (session or "no-session"), ignore_errors=True)


def write_views(folder: Path, stem: str, result) -> tuple[str, str, str]:
    """The image, overlay and mask as PNG files in the request's own folder: (image, overlay, mask) paths.
    Files, not arrays, because Gradio caches an array under its content hash and rewrites that file in place:
    two requests with the same empty mask shared one file, and a download racing the rewrite read it truncated.
    A file is copied into the cache under a temporary name and renamed, so a served copy is never rewritten."""
    from PIL import Image

    paths = folder / f"{stem}_image.png", folder / f"{stem}_overlay.png", folder / f"{stem}_mask.png"
    for picture, path in zip((Image.fromarray(result.image), result.overlay, result.mask_image), paths):
        picture.save(path, compress_level=PNG_LEVEL)
    return tuple(str(path) for path in paths)


def build_page(runs: dict[str, Path], samples: Path | None, params: Path | None, limits: Limits, scratch: Path):
    """The Gradio Blocks page; detectors load on first use and stay loaded."""
    import gradio as gr

    from d2dprompt.core.data.images import ImageError
    from d2dprompt.serve.detector import Detector, check_size

    detectors: dict[tuple[str, str | None], Detector] = {}
    downloads = Downloads(scratch / "downloads")
    upload_root = Path(os.environ.get("GRADIO_TEMP_DIR", scratch / "gradio"))
    recent = RecentUploads()
    restored_root = scratch / "restored"  # a deleted upload's recent bytes, written back for the request that holds its path
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
        backend = "ONNX graphs, onnxruntime" if det.exported else "PyTorch"
        info = f"**{det.method}** run `{runs[run]}` ({backend}), input side {det.image_size} px; thresholds: {det.thresholds.source}"
        return (
            gr.update(choices=det.categories, value=det.categories[0] if many else None, visible=many),
            # shown to SCORE_DIGITS decimals; `decided` reads a slider within SLIDER_STEP as the exact threshold
            gr.update(minimum=low, maximum=high, value=round(det.thresholds.image, SCORE_DIGITS)),
            gr.update(minimum=low, maximum=high, value=round(det.thresholds.pixel, SCORE_DIGITS)),
            info,
        )

    def view(names: list[str], results: list, shown: str | None, session: str):
        if not results:
            return "", None, None, None, None, None
        index = names.index(shown) if shown in names else 0
        result, name = results[index], names[index]
        folder = downloads.fresh(session)
        shown_files = write_views(folder, Path(name).stem, result)
        json_path = folder / "results.json"
        json_path.write_text(json.dumps(results_json(names, results), indent=2))
        return verdict_line(name, result), *shown_files, shown_files[-1], str(json_path)

    def table(names: list[str], results: list):
        return [[name, round(r.score, SCORE_DIGITS), "anomalous" if r.label else "normal", int(r.mask.sum())] for name, r in zip(names, results)]

    def read_all(items: list[tuple[str, Path]], min_side: int) -> tuple[list[str], list, list[str], list[str]]:
        names, arrays, problems, notes = [], [], [], []
        for position, (name, path) in enumerate(items):
            if position >= limits.max_images:
                problems.append(f"- {name}: not scored, more than {limits.max_images} images in one request (--max-images)")
                continue
            try:
                pixels, (width, height) = check_upload(path, limits, name, min_side)
                arrays.append(check_size(name, pixels, min_side))
                names.append(name)
            except ImageError as err:
                problems.append(f"- {err}")
                continue
            except OSError as err:  # gone or unreadable: the line names the upload, never the server's path
                problems.append(f"- {name}: could not be read ({err.strerror or type(err).__name__}); send it again")
                continue
            if max(pixels.shape[:2]) < max(width, height):
                notes.append(f"- {name}: {width}x{height} scored and shown at {pixels.shape[1]}x{pixels.shape[0]} (--work-side)")
        return names, arrays, problems, notes

    def detect(run, category, uploads, picked, image_t, pixel_t, request: gr.Request):
        det = detector_for(run, category)
        session = request.session_hash if request else ""
        uploaded = [str(u) for u in (uploads or [])]
        if not uploaded and not picked:
            return [], [], "Upload images or pick sample images first.", [], gr.update(choices=[], value=None), *view([], [], None, session)
        restored = restored_root / uuid.uuid4().hex
        try:
            items, gone = claimed_uploads(uploaded, recent, restored)
            names, arrays, problems, notes = read_all(items + [(p, samples / p) for p in (picked or [])], det.image_size)
            problems = gone + problems
        finally:
            remember_uploads(uploaded, recent, limits)
            delete_uploads(uploaded, upload_root)  # scored or refused, an upload is not kept on disk
            shutil.rmtree(restored, ignore_errors=True)
        scored, step = [], det.cfg.evaluate.batch_size
        for start in range(0, len(arrays), step):
            scored += det.predict_arrays(arrays[start : start + step])
        message = ("**Not scored:**\n" + "\n".join(problems)) if problems else ""
        if notes:
            message += ("\n\n" if message else "") + "**Downscaled:**\n" + "\n".join(notes)
        shown = names[0] if names else None
        results = decided(det, scored, image_t, pixel_t)
        return names, scored, message, table(names, results), gr.update(choices=names, value=shown), *view(names, results, shown, session)

    def redraw(run, category, names, scored, shown, image_t, pixel_t, request: gr.Request):
        results = decided(detector_for(run, category), scored, image_t, pixel_t)  # the maps stay; label and mask change
        return table(names, results), *view(names, results, shown, request.session_hash if request else "")

    def forget(request: gr.Request):
        downloads.forget(request.session_hash if request else "")

    with gr.Blocks(title="D2D-Prompt detector", delete_cache=CACHE_SWEEP_S) as page:
        gr.Markdown("# D2D-Prompt detector\nScore images with a trained run; the threshold sliders re-decide label and mask without recomputing the maps.")
        # this browser session's images and their predictions; Gradio drops them when the tab closes
        names_state, scored_state = gr.State([], time_to_live=STATE_TTL_S), gr.State([], time_to_live=STATE_TTL_S)
        with gr.Row():
            run = gr.Dropdown(list(runs), value=next(iter(runs)), label="trained run", elem_id="run")
            category = gr.Dropdown([], label="category (runs that know their categories)", visible=False, elem_id="category")
        run_info = gr.Markdown(elem_id="run-info")
        with gr.Row():
            uploads = gr.File(file_count="multiple", label=f"upload images (at most {limits.max_images}, {limits.max_mb:g} MB each)", elem_id="uploads")
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
                            [names_state, scored_state, problems, results_table, shown, *shown_outputs], api_name="detect",
                            concurrency_id=ONE_AT_A_TIME)
        redraw_inputs = [run, category, names_state, scored_state, shown, image_t, pixel_t]
        for slider in (image_t, pixel_t):
            slider.input(redraw, redraw_inputs, [results_table, *shown_outputs], trigger_mode="always_last", concurrency_id=ONE_AT_A_TIME)
        shown.input(redraw, redraw_inputs, [results_table, *shown_outputs], concurrency_id=ONE_AT_A_TIME)
        page.unload(forget)
    return page


def stop_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`) stops the server as Ctrl+C does, so the scratch folder is removed."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(
    runs: Path = typer.Option(Path("stages/train"), help="a train@<method> output or an exported folder, or the folder holding them"),
    samples: Path = typer.Option(Path("sample"), help="an MVTec-layout folder whose test images the page offers"),
    params: Path | None = typer.Option(None, help="params file [default: ./params.yaml when present, else the settings the thresholds were fitted with]"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 serves other machines too"),
    port: int = typer.Option(7860, min=1, max=65535, help="port to serve on"),
    max_mb: float = typer.Option(20.0, min=0.01, help="largest upload accepted, in MB (cut off while it streams in)"),
    max_megapixels: float = typer.Option(40.0, min=0.01, help="most pixels an image may have, in millions (read from its header)"),
    max_side: int = typer.Option(8192, min=1, help="largest image side accepted, in pixels"),
    work_side: int = typer.Option(1024, min=1, help="images are decoded down to this longer side (never below the model's input side)"),
    max_images: int = typer.Option(16, min=1, help="most images scored per request"),
    unclaimed_s: float = typer.Option(UNCLAIMED_S, min=1, help="seconds an upload never sent for detection stays on disk"),
) -> None:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check: before gradio is imported
    try:
        found = find_runs(runs)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    if params is not None and len(found) > 1:  # the run params.yaml lists first opens the page, the others follow
        from d2dprompt.core.runtime.config import ParamsError
        from d2dprompt.params import load_params

        try:
            listed = [m for m in load_params(params).methods if m in found]
        except ParamsError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        found = {name: found[name] for name in [*listed, *(n for n in found if n not in listed)]}
    scratch = Path(tempfile.mkdtemp(prefix="d2dprompt-app-"))  # uploads, Gradio's cache, the downloads: gone at stop
    os.environ["GRADIO_TEMP_DIR"] = str(scratch / "gradio")  # read when gradio is imported: uploads land in scratch
    stop_on_sigterm()
    try:
        limits = Limits(max_mb, max_megapixels, max_side, work_side, max_images)
        page = build_page(found, samples, params, limits, scratch)
        typer.echo(f"D2D-Prompt detector: http://{host}:{port}/  ({len(found)} run{'s' if len(found) > 1 else ''} from {runs}; Ctrl+C stops)")
        import gradio as gr

        from starlette.middleware import Middleware

        theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # system fonts: no web-font fetch
        upload_root = Path(os.environ["GRADIO_TEMP_DIR"])
        budget = Middleware(UploadBudget, limits=limits, upload_root=upload_root)
        start_sweeper(upload_root, lambda: page.upload_file_set, unclaimed_s, min(SWEEP_EVERY_S, unclaimed_s / 2))
        page.launch(server_name=host, server_port=port, allowed_paths=[str(scratch / "downloads")], theme=theme, css=PAGE_CSS,
                    show_error=True, quiet=True, max_file_size=int(max_mb * 2**20), app_kwargs={"middleware": [budget]})
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
