"""python -m d2dprompt.export stages/train/d2dprompt --format onnx --out exported/d2dprompt

Export a trained run to ONNX graphs that onnxruntime scores without torch, diffusers or DVC (README "Deploy").

One graph per category (one in all for a run without categories) from pixels to evaluate's maps and image scores:
the method's `export_graph` (methods/graph.py), traced with the batch size left free. Beside the graphs go
thresholds.json (evaluate's, checked against the settings as predict checks it), preprocessing.json, the run's
model.json and manifest.json (the source run's hashes, each graph file's sha256, versions). Before anything is
written, every graph is run by onnxruntime on check images (up to 8 real test images of its category from the
download stage's folder when they are there, and 3 seeded synthetic ones) and compared with the PyTorch path predict
takes (the method's encode + scorer): an export whose maps differ by more than the method's tolerance (1e-4 for maps in [0, 1];
`Method.export_tolerance`), or whose decision at the thresholds differs for an image scored farther than that from
the threshold, is refused. The folder appears whole or not at all.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import typer

from d2dprompt.core.runtime.cli import app_for
from d2dprompt.serve import onnx_backend as ob

OPSET = 17  # onnxruntime 1.16+ runs it; the TorchScript exporter's best-tested opset
CHECK_IMAGES = 3  # images of the parity check: a batch size unlike the trace's, so a fixed batch would show
TRACE_BATCH = 2  # the example batch the graph is traced with
REAL_IMAGES = 8  # real test images per category in the parity check, spread over its good and defective ones
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def real_images(downloads: Path | None, category: str | None, side: int, count: int = REAL_IMAGES) -> list[np.ndarray]:
    """Up to `count` test images of `category` ('<dataset>/<category>'; None: every prepared dataset's) under the
    download stage's folder, evenly spread over their sorted paths, resized to `side` as predict resizes them; none
    when the folder is not there (an export on another machine)."""
    from d2dprompt.core.data.images import load_rgb, resize_rgb

    if downloads is None or not downloads.is_dir():
        return []
    pattern = f"{category}/test/*/*" if category else "*/*/test/*/*"
    paths = sorted(p for p in downloads.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES)
    chosen = [paths[round(i * (len(paths) - 1) / max(1, count - 1))] for i in range(min(count, len(paths)))]
    return [resize_rgb(load_rgb(path), side) for path in dict.fromkeys(chosen)]


def check_images(count: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded uint8 images (smooth shapes on noise), so the check covers both flat and detailed regions."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(count):
        base = 0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y))[..., None] * rng.uniform(0.2, 1, 3)
        noisy = base + rng.normal(0, 0.08, (side, side, 3))
        images.append((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))
    return images


def export_graph_file(graph, side: int, dest: Path) -> None:
    """Trace `graph` on a (TRACE_BATCH, 3, side, side) example and write dest (external weight files beside it past 2 GB)."""
    import torch

    example = torch.from_numpy(ob.to_pixels(check_images(TRACE_BATCH, side, seed=1)))
    with torch.no_grad():  # the tracer's warnings are shown: each names a Python value the graph now holds fixed
        torch.onnx.export(graph.eval(), (example,), str(dest), dynamo=False, opset_version=OPSET, input_names=[ob.INPUT],
                          output_names=list(ob.OUTPUTS), dynamic_axes={name: {0: "batch"} for name in (ob.INPUT, *ob.OUTPUTS)})


def parity(torch_maps: np.ndarray, torch_scores: np.ndarray, onnx_maps: np.ndarray, onnx_scores: np.ndarray,
           image_threshold: float, tolerance: float) -> dict:
    """The largest map and score differences and the image decisions at `image_threshold` that differ: all of them,
    and those of images whose PyTorch score lies farther than `tolerance` from the threshold (closer, a score
    difference within the tolerance may flip a decision; beyond, none may)."""
    flipped = (torch_scores >= image_threshold) != (onnx_scores >= image_threshold)
    near = np.abs(torch_scores - image_threshold) <= tolerance
    return {"max_map_difference": float(np.abs(torch_maps - onnx_maps).max()),
            "max_score_difference": float(np.abs(torch_scores - onnx_scores).max()),
            "decision_flips": int(flipped.sum()), "flips_away_from_threshold": int((flipped & ~near).sum()),
            "near_threshold": int(near.sum())}


def export(trained: Path, out: Path, thresholds: str | None = "auto", dataset: str | None = None, params: Path | None = None,
           tolerance: float | None = None, echo=print, downloads: Path | None = Path("stages/download")) -> dict:
    """Write the exported folder of `trained` to `out` (see the module docstring); returns its manifest."""
    import onnx
    import torch

    from d2dprompt import __version__
    from d2dprompt.core.runtime.outputs import atomic_dir, write_json
    from d2dprompt.core.training import CONFIG_FILE, WEIGHTS_FILE
    from d2dprompt.methods.base import Scoring
    from d2dprompt.serve.detector import THRESHOLDS_FILE, Detector, local_source, trained_folder
    from d2dprompt.trained import read_record

    if out.exists() and not ob.is_exported(out):
        raise FileExistsError(f"{out}: exists and is not an exported folder; choose another --out")
    first = (read_record(trained_folder(local_source(trained)[0], None))[0].get("categories") or [None])[0]  # one per graph below
    detector = Detector.load(trained, thresholds=thresholds, dataset=dataset, params=params, device="cpu", backend="torch", category=first)
    folder, record, cfg = detector.folder, detector.record, detector.cfg
    method, model, side = detector.method_object, detector.backend.model, detector.image_size
    scoring = Scoring.of(cfg.evaluate, cfg.loss, cfg.model)
    tolerance = method.export_tolerance(record) if tolerance is None else tolerance
    categories = list(record.get("categories", [])) or [None]
    synthetic = check_images(CHECK_IMAGES, side)
    graphs, checks = [], []
    with atomic_dir(out) as tmp:
        for index, category in enumerate(categories):
            graph_dir = tmp / "graphs" / str(index)
            graph_dir.mkdir(parents=True)
            export_graph_file(method.export_graph(model, record, scoring, category), side, graph_dir / "model.onnx")
            onnx.checker.check_model(str(graph_dir / "model.onnx"))  # by path: a graph past 2 GB keeps its weights in files
            session = ob.OnnxGraphs.session_for(graph_dir / "model.onnx")
            found = real_images(downloads, category, side)
            images = found + synthetic
            onnx_maps, onnx_scores = session.run(list(ob.OUTPUTS), {ob.INPUT: ob.to_pixels(images)})
            torch_maps, torch_scores = detector.for_category(category)._score(images)
            check = {"category": category, "real_images": len(found), "images": len(images), **parity(torch_maps, torch_scores, onnx_maps, onnx_scores, detector.thresholds.image, tolerance)}
            where = f" ({category})" if category else ""
            if not (check["max_map_difference"] <= tolerance and check["max_score_difference"] <= tolerance) or check["flips_away_from_threshold"]:
                raise ValueError(f"{folder}{where}: the ONNX graph differs from PyTorch (max |map difference| "
                                 f"{check['max_map_difference']:.2e}, max |score difference| {check['max_score_difference']:.2e}, "
                                 f"tolerance {tolerance:g}; {check['flips_away_from_threshold']} decisions flip away from the threshold): not exported")
            echo(f"graph {index}{where}: max |map difference| {check['max_map_difference']:.2e}, "
                 f"max |score difference| {check['max_score_difference']:.2e} on {len(found)} real and {len(synthetic)} synthetic check images")
            files = {p.name: ob.sha256_file(p) for p in sorted(graph_dir.iterdir())}
            graphs.append({"category": category, "folder": f"graphs/{index}", "graph": "model.onnx", "files": files})
            checks.append(check)
        shutil.copyfile(folder / CONFIG_FILE, tmp / CONFIG_FILE)
        chosen = detector.thresholds_file
        if chosen is not None:
            shutil.copyfile(chosen, tmp / THRESHOLDS_FILE)
        ev = cfg.evaluate
        write_json(tmp / ob.PREPROCESSING, {
            "input": ob.INPUT, "side": side, "layout": "NCHW", "dtype": "float32", "color": "RGB",
            "resize": "to side x side, bicubic, antialiased when shrinking (PIL Image.resize, BICUBIC); smaller images are refused",
            "scale": "uint8 / 255 -> [0, 1]",
            "outputs": {"maps": f"(B, {ev.map_size}, {ev.map_size}) float32, evaluate's maps", "scores": "(B,) float32 image scores"},
        })
        hashed = [ob.RECORD, ob.PREPROCESSING, *([ob.THRESHOLDS] if chosen is not None else [])]
        manifest = {
            "format": ob.FORMAT, "format_version": ob.FORMAT_VERSION, "method": method.name, "graphs": graphs,
            "files": {name: ob.sha256_file(tmp / name) for name in hashed},
            "source": {"folder": str(folder), CONFIG_FILE: ob.sha256_file(folder / CONFIG_FILE),
                       WEIGHTS_FILE: ob.sha256_file(folder / WEIGHTS_FILE),
                       THRESHOLDS_FILE: ob.sha256_file(chosen) if chosen is not None else None},
            "evaluate": ev.model_dump(exclude={"datasets", "grid_cases"}),
            "loss": {"image_top_percent": cfg.loss.image_top_percent},
            "thresholds": {"image": detector.thresholds.image, "pixel": detector.thresholds.pixel, "source": detector.thresholds.source},
            "parity": {"tolerance": tolerance, "synthetic_images": len(synthetic), "checks": checks},
            "versions": {"d2dprompt": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / ob.MANIFEST, manifest)
    return manifest


def main(
    trained: Path = typer.Argument(..., help="a train@<method> output (model.json + model.safetensors)"),
    out: Path = typer.Option(..., help="the exported folder to write (replaced when it holds an earlier export)"),
    format: str = typer.Option("onnx", "--format", help="onnx, the one format there is"),
    thresholds: str = typer.Option("auto", help="auto (evaluate's file for this run), a thresholds.json, or none"),
    dataset: str | None = typer.Option(None, help="whose thresholds, when evaluate fitted several datasets"),
    params: Path | None = typer.Option(None, help="params file whose evaluate block the graphs compute with [default: the thresholds' own settings]"),
    tolerance: float | None = typer.Option(None, min=0.0, help="largest |map difference| against PyTorch an export may show "
                                           "[default: the method's, 1e-4 for maps in [0, 1] (methods/base.py export_tolerance)]"),
    downloads: Path = typer.Option(Path("stages/download"), help="download stage output: real test images for the parity check, when there"),
) -> None:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        typer.echo(f"error: exporting runs the trained model in PyTorch and builds graphs with onnx ({err}): "
                   "pip install 'd2dprompt[train]'", err=True)
        raise typer.Exit(1) from None
    from d2dprompt.core.runtime.config import ParamsError
    from d2dprompt.methods.graph import NotExportable
    from d2dprompt.serve.detector import ThresholdsError

    if format != "onnx":
        typer.echo(f"error: --format {format}: the formats are onnx", err=True)
        raise typer.Exit(2)
    try:
        manifest = export(trained, out, None if thresholds == "none" else thresholds, dataset, params, tolerance, typer.echo, downloads)
    except (NotExportable, ParamsError, ThresholdsError, ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    count = len(manifest["graphs"])
    typer.echo(f"{manifest['method']}: {count} graph{'s' if count > 1 else ''} -> {out}; thresholds: {manifest['thresholds']['source']}")


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
