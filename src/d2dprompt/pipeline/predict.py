"""python -m d2dprompt.pipeline.predict IMAGE_OR_FOLDER [--trained stages/train/d2dprompt] [--out predictions] [--params params.yaml]
       [--thresholds stages/evaluate/<method>/<dataset>/thresholds.json] [--image-threshold X] [--pixel-threshold Y] [--batch-size N]
       [--workers 2] [--backend auto|torch|onnx]

Runs a trained method (`--trained stages/train/<method>`) on one image or on every image under a folder (recursive,
sorted), through the Python API's scoring (detector.Detector). Per image it writes `<out>/<relative stem>_overlay.png`
(image | anomaly map | overlay with the predicted mask outlined), `<out>/<relative stem>_mask.png` (0/255 at the
image's original size) and one JSON line in `<out>/predictions.jsonl`. Thresholds come from `--thresholds` (fitted on a
validation split by the evaluate stage), are overridden by `--image-threshold` / `--pixel-threshold`,
and otherwise fall back to `evaluate.sensitivity`; every line says which. Files that cannot be
predicted are skipped, named on stderr and listed in `<out>/errors.txt` with the reason: unreadable
images, files under the folder without an image suffix, and images with a side shorter than the
model's input side (`model.image_size` of the trained run; upscaling would invent the detail
the model judges). The exit status is 1 only when no image could be predicted. Outside a checkout
(no params.yaml where it runs) the trained folder and its thresholds.json are enough: the map scale comes
from the thresholds file, the rest from the defaults.

`--trained` may also be a folder `python -m d2dprompt.export` wrote: its ONNX graphs then score with onnxruntime
(`--backend onnx` insists on one), on a machine with neither torch nor diffusers, and give the scores PyTorch gives.

A folder of any size streams: `--workers` DataLoader processes decode the images, so memory holds a few batches.
Each finished image's line is appended to `<out>/predictions.partial-<rank>.jsonl` as it lands; a run killed midway
and started again with the same `--out` reuses every finished image whose run, thresholds, settings and file (size,
mtime) are unchanged, predicts the rest, then writes predictions.jsonl and errors.txt whole.

Under `torchrun --nproc_per_node=N -m d2dprompt.pipeline.predict ...` each process takes every N-th image on its own GPU
and writes those images' masks and overlays; rank 0 gathers the lines and writes predictions.jsonl and errors.txt.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from PIL import Image
from tqdm import tqdm

from d2dprompt.core.runtime.config import ParamsError
from d2dprompt.core.runtime.cli import app_for
from d2dprompt.serve.detector import THRESHOLDS_FILE, ThresholdsError, check_size
from d2dprompt.core.data.images import ImageError, load_rgb, resize_rgb
from d2dprompt.core.runtime.outputs import atomic_file
from d2dprompt.core.eval.overlays import render_overlay

if TYPE_CHECKING:
    from d2dprompt.serve.detector import Detector

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # what Pillow decodes and datasets ship
PREDICTIONS_FILE, ERRORS_FILE = "predictions.jsonl", "errors.txt"
PR_SET_PDEATHSIG = 1  # prctl option from <linux/prctl.h>
PARTIAL_GLOB = "predictions.partial-*.jsonl"  # one per process, appended as images finish: what a killed run leaves


@dataclass(frozen=True)
class InputImage:
    path: Path
    key: str  # path relative to the input root (posix): the output stem


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


def output_stems(keys: list[str]) -> dict[str, str]:
    """key -> output stem: the key without its suffix, or the whole key where two images share a stem."""
    stems = {key: key.rsplit(".", 1)[0] if "." in Path(key).name else key for key in keys}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {key: stem if counts[stem] == 1 else key for key, stem in stems.items()}


def save_png(image: Image.Image, dest: Path) -> None:
    with atomic_file(dest) as tmp:
        image.save(tmp, format="PNG")


def run_identity(detector: Detector) -> str:
    """What a prediction depends on besides the image: the trained folder, the thresholds, the evaluate settings,
    the category. A resumed run reuses only lines written under the same identity."""
    from d2dprompt.core.training import CONFIG_FILE, WEIGHTS_FILE
    from d2dprompt.serve.onnx_backend import MANIFEST

    weights = (detector.folder / (MANIFEST if detector.exported else WEIGHTS_FILE)).stat()  # an export's manifest holds its graphs' sha256
    facts = {
        "record": (detector.folder / CONFIG_FILE).read_text(),
        "backend": "onnx" if detector.exported else "torch",
        "weights": [weights.st_size, weights.st_mtime_ns],  # a hash of a DRAEM folder would read gigabytes
        "thresholds": [detector.thresholds.image, detector.thresholds.pixel, detector.thresholds.source],
        "evaluate": detector.cfg.evaluate.model_dump(exclude={"batch_size", "datasets", "grid_cases"}),
        "category": detector.category,
        "precision": detector.cfg.model.precision,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def finished_records(out: Path, inputs: list[InputImage], identity: str) -> dict[str, dict]:
    """key -> record of the images an earlier run into `out` already predicted: same identity, the image file
    unchanged (size, mtime), its mask and overlay written. A line cut short by a kill is ignored."""
    wanted = {item.key: item for item in inputs}
    done: dict[str, dict] = {}
    for name in (PREDICTIONS_FILE, *sorted(p.name for p in out.glob(PARTIAL_GLOB))):
        path = out / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run
            item = wanted.get(record.get("key")) if isinstance(record, dict) else None
            if (item is not None and record.get("run") == identity and record.get("stamp") == file_stamp(item.path)
                    and Path(record["mask"]).is_file() and Path(record["overlay"]).is_file()):
                done[item.key] = record
    return done


def die_with_parent(_worker: int) -> None:
    """DataLoader worker_init_fn: the kernel kills this worker when predict dies, even by SIGKILL (a worker blocked
    on a full queue would otherwise outlive it). Linux only; elsewhere torch's own watchdog is all there is."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def decoded_batches(files: ImageFiles, batch_size: int, workers: int):
    """Batches of `files` (lists of its items), decoded by `workers` processes: torch's DataLoader, which decodes ahead
    while a batch is scored; where torch is not installed (an exported folder's machine), a process pool per batch."""
    try:
        from torch.utils.data import DataLoader
    except ImportError:
        return _pool_batches(files, batch_size, workers)
    return DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=list,
                      prefetch_factor=2 if workers else None, worker_init_fn=die_with_parent if workers else None)


def _pool_batches(files: ImageFiles, batch_size: int, workers: int):
    import multiprocessing

    starts = range(0, len(files), batch_size)
    if not workers:
        yield from ([files[i] for i in range(start, min(start + batch_size, len(files)))] for start in starts)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=die_with_parent, initargs=(0,)) as pool:
        for start in starts:
            yield pool.map(files.__getitem__, range(start, min(start + batch_size, len(files))))


class ImageFiles:
    """Map-style dataset for torch's DataLoader: decoding (and the size check) runs in its worker processes."""

    def __init__(self, inputs: list[InputImage], image_size: int) -> None:
        self.inputs, self.image_size = inputs, image_size

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        item = self.inputs[index]
        try:
            return item, check_size(str(item.path), load_rgb(item.path), self.image_size), None
        except ImageError as err:
            return item, None, str(err)


def predict_images(
    detector: Detector,
    inputs: list[InputImage],
    out: Path,
    batch_size: int,
    progress: bool = True,
    workers: int = 2,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[dict], list[str], int]:
    """Scores `inputs` with `detector` (Detector.predict_arrays, the API's path), `batch_size` per forward, images
    decoded by `workers` DataLoader processes, so memory holds a few batches whatever the folder's size.

    Resumable: each finished image's line is appended (and flushed) to a partial file; a rerun into the same `out`
    skips the images already done (finished_records). `shard` = (rank, world size): this process predicts every
    world-th image from rank and appends to its own partial file. The caller writes the whole files
    (`write_results`). Returns (records of every image done so far, this process's error lines, images resumed).
    """
    ev, thresholds = detector.cfg.evaluate, detector.thresholds
    identity = run_identity(detector)
    stems = output_stems([item.key for item in inputs])
    rank, world = shard
    done = finished_records(out, inputs, identity)
    todo = [item for item in inputs[rank::world] if item.key not in done]
    errors: list[str] = []
    partial = out / PARTIAL_GLOB.replace("*", str(rank))
    loader = decoded_batches(ImageFiles(todo, detector.image_size), batch_size, workers)
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress)
    out.mkdir(parents=True, exist_ok=True)
    with partial.open("a") as lines:
        for batch in loader:
            for item, _, error in batch:
                if error is not None:
                    errors.append(error)
                    tqdm.write(f"skipped: {error}", file=sys.stderr)
            good = [(item, pixels) for item, pixels, error in batch if error is None]
            for (item, _), result in zip(good, detector.predict_arrays([pixels for _, pixels in good]) if good else []):
                mask_path = out / f"{stems[item.key]}_mask.png"
                overlay_path = out / f"{stems[item.key]}_overlay.png"
                save_png(result.mask_image, mask_path)
                verdict = "anomalous" if result.label else "normal"
                title = f"{item.key}   score {result.score:.4f} vs {thresholds.image:.4f} -> {verdict}\nthresholds: {thresholds.source}"
                save_png(render_overlay(resize_rgb(result.image, ev.map_size), result.map, result.map_mask, title, result.display), overlay_path)
                done[item.key] = {
                    "image": str(item.path),
                    "key": item.key,
                    "score": result.score,
                    "label": result.label,
                    "image_threshold": thresholds.image,
                    "pixel_threshold": thresholds.pixel,
                    "threshold_source": thresholds.source,
                    "mask": str(mask_path),
                    "overlay": str(overlay_path),
                    "run": identity,
                    "stamp": file_stamp(item.path),
                }
                lines.write(json.dumps(done[item.key]) + "\n")
            lines.flush()
            bar.update(len(batch))
    bar.close()
    resumed = len(inputs[rank::world]) - len(todo)
    return [done[item.key] for item in inputs if item.key in done], errors, resumed


def merge_shards(results: list[tuple[list[dict], list[str], int]] | None) -> tuple[list[dict], list[str], int]:
    """One (records, errors, resumed) from every process's predict_images (rank 0); ([], [], 0) on the others.
    A record a process resumed from another's partial file may come from several: keyed by image, kept once."""
    if results is None:
        return [], [], 0
    records = {r["key"]: r for part, _, _ in results for r in part}
    return list(records.values()), [e for _, part, _ in results for e in part], sum(n for _, _, n in results)


def write_results(out: Path, inputs: list[InputImage], records: list[dict], errors: list[str], skipped: list[str]) -> list[str]:
    """predictions.jsonl (in input order) and errors.txt, written whole; the partial files go. Returns the error lines."""
    order = {item.key: i for i, item in enumerate(inputs)}
    with atomic_file(out / PREDICTIONS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: order[r["key"]])))
    errors = sorted(skipped + errors)
    with atomic_file(out / ERRORS_FILE) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in errors))
    for partial in out.glob(PARTIAL_GLOB):
        partial.unlink()
    return errors


def skipped_note(failed: int, others: int, out: Path) -> str:
    """What the summary says beside the count: images that could not be predicted and other files, apart, so the
    numbers add up to what the folder holds."""
    parts = [f"{failed} image{'s' if failed != 1 else ''} could not be predicted"] if failed else []
    parts += [f"{others} other file{'s' if others != 1 else ''} skipped"] if others else []
    return f"; {' and '.join(parts)} (listed in {out / ERRORS_FILE})" if parts else ""


def check_out(out: Path) -> None:
    """--out must be a folder, or a path where one can be made: refused before any model loads, nothing created."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --out is a file, not a folder; choose a folder for the predictions")
    above = out
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{out}: --out lies under {above}, which is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: --out cannot be written ({above} is not writable)")


def main(
    target: Path = typer.Argument(..., help="an image, or a folder searched recursively for images"),
    trained: Path = typer.Option(Path("stages/train/d2dprompt"), "--trained", "--prompts", help="a train@<method> output (model.json + model.safetensors)"),
    out: Path = typer.Option(Path("predictions"), help="where masks, overlays and predictions.jsonl go"),
    params: Path | None = typer.Option(None, help="params file (evaluate block, model.device) [default: ./params.yaml; "
                                        "outside a checkout: the defaults with the map scale --thresholds records]"),
    thresholds: Path | None = typer.Option(None, help="thresholds.json written by the evaluate stage [default: the one beside --trained's model.json, as an exported folder has]"),
    image_threshold: float | None = typer.Option(None, help="overrides the image threshold"),
    pixel_threshold: float | None = typer.Option(None, help="overrides the pixel threshold"),
    batch_size: int | None = typer.Option(None, min=1, help="images per forward (default: evaluate.batch_size)"),
    workers: int = typer.Option(2, min=0, help="DataLoader processes decoding images (0: in this process)"),
    category: str | None = typer.Option(None, help="draem (a model per category) and decodiff (a class label per category): which, as <dataset>/<category>"),
    backend: str = typer.Option("auto", help="torch (a trained folder), onnx (a folder python -m d2dprompt.export wrote; "
                                "runs with onnxruntime alone), or auto: by the folder"),
) -> None:
    from d2dprompt.core.runtime import distributed
    from d2dprompt.params import load_params, params_from_dict
    from d2dprompt.serve.detector import Detector  # torch and the models load here, not for --help

    try:
        check_out(out)
        if thresholds is None and (trained / THRESHOLDS_FILE).is_file():  # an exported folder's own (or one put beside model.json)
            thresholds = trained / THRESHOLDS_FILE
        inputs, skipped = find_inputs(target, exclude=out)
        if params is None and Path("params.yaml").is_file():
            params = Path("params.yaml")
        elif params is None:
            typer.echo(f"no params.yaml here: default settings{f', map scale from {thresholds}' if thresholds else ''}", err=True)
        cfg = load_params(params) if params is not None else params_from_dict({})  # the process count and device first
        with distributed.process_group(cfg.distributed, cfg.model.device):
            detector = Detector.load(trained, thresholds=thresholds, params=params, category=category, backend=backend,
                                     image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                                     device=str(distributed.device(cfg.model.device)) if distributed.world_size() > 1 else None)
            chosen, main = detector.thresholds, distributed.is_main()
            for line in skipped if main else []:
                typer.echo(f"skipped: {line}", err=True)
            shard = (distributed.rank(), distributed.world_size())
            results = predict_images(detector, inputs, out, batch_size or detector.cfg.evaluate.batch_size,
                                     progress=len(inputs) > 1 and main, workers=workers, shard=shard)
            records, errors, resumed = merge_shards(distributed.gather_objects(results))
            if main:
                if resumed:
                    typer.echo(f"resumed: {resumed} of {len(inputs)} images were predicted by an earlier run into {out} (same run, thresholds and files)")
                errors = write_results(out, inputs, records, errors, skipped)
    except (ParamsError, ThresholdsError, ImageError, ValueError, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:  # the system's: writing outputs (a read-only disk, no permission)
            typer.echo(f"error: {err.filename or out}: cannot write predictions there ({err.strerror})", err=True)
        else:  # ours, one line naming the file already (a missing input is a FileNotFoundError of ours)
            typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if not main:
        return
    for record in records if len(inputs) == 1 else []:
        verdict = "anomalous" if record["label"] else "normal"
        typer.echo(f"{record['image']}: score {record['score']:.4f} vs {chosen.image:.4f} -> {verdict}; mask {record['mask']}")
    typer.echo(f"{len(records)} of {len(inputs)} images -> {out / PREDICTIONS_FILE}{skipped_note(len(inputs) - len(records), len(skipped), out)}; "
               f"thresholds: {chosen.source}")
    if not records:
        typer.echo(f"error: {target}: no image could be predicted", err=True)
        raise typer.Exit(1)


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
