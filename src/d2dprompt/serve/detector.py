"""The Python API: a trained run as one object that scores images.

    from d2dprompt import Detector

    det = Detector.load("stages/train")                       # or stages/train/<method>, runs:/<run id>/detector, ...
    res = det.predict("sample/weave/test/hole/000.png")       # a path, image bytes, a PIL image or an HxWx3 uint8 array
    print(res.score, res.label, res.anomaly_map.shape, res.mask.shape)
    res.overlay.save("overlay.png")                           # the map blended over the image, predicted mask outlined
    stricter = res.with_thresholds(pixel=0.8)                 # a new mask and label, the map is not recomputed

`Detector.load` reads a trained folder (model.json + model.safetensors), a folder of them (`stages/train`,
naming `method=` when it holds several), an MLflow model folder or any MLflow artifact URI (`runs:/<id>/detector`,
`models:/<name>/<version>`), or a folder `python -m d2dprompt.export` wrote, which onnxruntime scores without torch
(onnx_backend.py; `backend="onnx"` insists on one). Thresholds come from evaluate's thresholds.json: `thresholds=` a file, or by default the
one evaluate wrote for this run (`stages/evaluate/<method>/<dataset>/thresholds.json`, naming `dataset=` when there are
several; one bundled in an MLflow model); without one, `evaluate.sensitivity` on the [0, 1] map scale, and every
result says which. The predict CLI and the web app score through `Detector.predict_arrays`, which runs the method's
own `encode` and `scorer` (methods/base.py), the scorer evaluate runs on its stored rows, so an image gets evaluate's
score.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from d2dprompt.core.runtime.config import EvaluateParams, ParamsError
from d2dprompt.params import Params, load_params, params_from_dict
from d2dprompt.core.data.images import ImageError, resize_rgb, rgb_of
from d2dprompt.core.eval.overlays import mask_at_size, overlay_at_size
from d2dprompt.core.eval.thresholds import Thresholds, binary_masks

FALLBACK_SOURCE = "fixed sensitivity"
# encoded bytes (the MLflow model's REST requests) above this many million pixels are refused from their header: the
# web app's default (--max-megapixels); a 493 KB PNG of 13000 x 13000 decoded to 10.9 GB before
BYTES_MEGAPIXELS = 40.0
# Threshold-file keys that change the scale thresholds live on, or the masks they were fitted on: a file fitted
# under other settings is refused.
SCALE_KEYS = ("score", "map_size", "sigma", "top_percent", "opening_kernel", "min_area")
THRESHOLDS_FILE = "thresholds.json"
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")  # artifact URIs handed to mlflow.artifacts


class ThresholdsError(ValueError):
    """A thresholds file that is missing, malformed, or fitted under other evaluate settings."""


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
    for key in ("display_range", "score_range"):  # the maps' colour range, the normalised score's scale
        pair = record.get(key, [0.0, 1.0])
        if (not isinstance(pair, list) or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in pair)
                or pair[0] > pair[1]):
            raise ThresholdsError(f"{path}: key '{key}' must be two finite numbers [low, high] with low <= high, got {pair!r}")
    if not isinstance(record.get("method", method), str) or record.get("method", method) != method:
        raise ThresholdsError(f"{path}: fitted for method {record.get('method')!r}, not for the {method!r} run predicting")
    from d2dprompt.methods import registry

    for key in SCALE_KEYS:
        expected = registry.get(method).image_score_name(ev.score) if key == "score" else getattr(ev, key)
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


def display_of(thresholds: Path | None) -> tuple[float, float]:
    """The colour range evaluate recorded beside the thresholds (its grids use it); [0, 1] without one."""
    if thresholds is None:
        return (0.0, 1.0)
    low, high = json.loads(thresholds.read_text()).get("display_range", [0.0, 1.0])  # resolve_thresholds read it already
    return (float(low), float(high)) if high > low else (0.0, 1.0)


def score_range_of(thresholds: Path | None) -> tuple[float, float] | None:
    """The validation image scores' [min, max] evaluate recorded beside the thresholds; None without one (no
    normalised score then: a scale guessed elsewhere would move the 0.5 line)."""
    if thresholds is None:
        return None
    low, high = json.loads(thresholds.read_text()).get("score_range", [0.0, 0.0])  # resolve_thresholds read it already
    return (float(low), float(high)) if high > low else None


def settings(params: Path | None, thresholds: Path | None, trained: Path) -> Params:
    """`params` when given; otherwise (a trained folder copied to another machine) the defaults, with the map scale
    and image score that `thresholds` was fitted on, and the trained run's own loss.image_top_percent, so a score
    here is the score evaluate gave."""
    if params is not None:
        return load_params(params)  # checked before any model or record is read
    from d2dprompt.trained import read_record

    record, _, method = read_record(trained)
    raw: dict = {"evaluate": {}}
    if thresholds is not None and thresholds.is_file():
        try:
            fitted = json.loads(thresholds.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ThresholdsError(f"{thresholds}: not valid JSON ({err})") from None
        raw["evaluate"] = {k: fitted[k] for k in SCALE_KEYS if k in fitted and not (k == "score" and fitted[k] == method.name)}
    if "loss" in record:
        raw["loss"] = {"image_top_percent": record["loss"]["image_top_percent"]}
    try:
        return params_from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{thresholds}: {err}") from None


def check_size(name: str, image: np.ndarray, image_size: int) -> np.ndarray:
    """Refuse an image with a side shorter than the model's input side: upscaling invents its detail."""
    height, width = image.shape[:2]
    if min(height, width) < image_size:
        raise ImageError(f"{name}: image is {width}x{height}, smaller than the model's input side {image_size} (the input size of the trained run)")
    return image


def in_progress(folder: Path) -> str | None:
    """One line saying that a DVC run is writing `folder` now (it deleted the previous run first), or None."""
    from d2dprompt.core.runtime.outputs import being_written

    writer = being_written(folder)
    if writer is None:
        return None
    return (f"{folder}: a training run is in progress and writes here now ({writer}); wait for it to finish, "
            "or keep the workspace's run by training with `dvc exp run --temp` / `--queue`")


def listed_methods(params: Params | None) -> list[str]:
    """The methods `params` lists, else the ones ./params.yaml lists when there is one (a checkout), else none:
    which of several runs a caller who names none is studying."""
    if params is not None:
        return list(params.methods)
    return list(load_params(Path("params.yaml")).methods) if Path("params.yaml").is_file() else []


def trained_folder(source: Path, method: str | None, preferred: list[str] | None = None) -> Path:
    """`source` itself when it holds model.json, else its one (or its `method`) run folder; among several, the first
    of `preferred` (params.yaml's `methods`) that has a run."""
    from d2dprompt.core.training import CONFIG_FILE

    if (source / CONFIG_FILE).is_file():
        return source
    runs = sorted(p.parent.name for p in source.glob(f"*/{CONFIG_FILE}"))
    busy = in_progress(source / method if method else source)
    if busy and (not runs or (method is not None and method not in runs)):
        raise FileNotFoundError(busy)
    if method is not None:
        if method not in runs:
            raise FileNotFoundError(f"{source}: no trained run {method!r} here ({' | '.join(runs) or 'none'})")
        return source / method
    if len(runs) > 1 and any(m in runs for m in preferred or []):
        return source / next(m for m in preferred if m in runs)
    if len(runs) != 1:
        found = f"several runs ({', '.join(runs)}): pass method=" if runs else "no model.json: not a trained run; run the train stage first"
        raise FileNotFoundError(f"{source}: {found}")
    return source / runs[0]


def evaluated_thresholds(trained: Path, dataset: str | None) -> Path | None:
    """thresholds.json beside model.json (an MLflow model bundles it), else the one evaluate wrote for this run in
    the same checkout (stages/evaluate/<method>/<dataset>/), else None."""
    if (trained / THRESHOLDS_FILE).is_file():
        return trained / THRESHOLDS_FILE
    evaluated = trained.parent.parent / "evaluate" / trained.name
    found = {p.parent.name: p for p in sorted(evaluated.glob(f"*/{THRESHOLDS_FILE}"))}
    if dataset is not None:
        if dataset not in found:
            raise ThresholdsError(f"{evaluated / dataset / THRESHOLDS_FILE}: not found; run evaluate@{trained.name}-{dataset}")
        return found[dataset]
    if len(found) > 1:
        raise ThresholdsError(f"{evaluated}: thresholds for several datasets ({', '.join(found)}): pass dataset=")
    return next(iter(found.values()), None)


def local_source(source: str | Path) -> tuple[Path, Path | None]:
    """(the trained folder or the folder holding it, the params.yaml an MLflow model bundles or None).

    An MLflow URI is downloaded first; an MLflow model folder (MLmodel file) holds the run under artifacts/."""
    text = str(source)
    if text.startswith(MLFLOW_SCHEMES):
        import mlflow

        source = mlflow.artifacts.download_artifacts(artifact_uri=text)
    folder = Path(source)
    if not folder.exists():
        raise FileNotFoundError(in_progress(folder) or f"{folder}: no such trained run folder")
    if (folder / "MLmodel").is_file():  # an MLflow model logged by train: its artifacts name the folder and params
        import yaml

        artifacts = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"].get("artifacts", {})
        if "trained" not in artifacts:
            raise FileNotFoundError(f"{folder / 'MLmodel'}: not a d2dprompt detector (no 'trained' artifact)")
        params = folder / artifacts["params"]["path"] if "params" in artifacts else None
        return folder / artifacts["trained"]["path"], params
    return folder, None


@dataclass(frozen=True)
class Prediction:
    """One image's result. Arrays are at the image's own size; `map` is the evaluate.map_size map the thresholds apply to."""

    score: float
    label: int  # 1 = anomalous: score >= thresholds.image
    anomaly_map: np.ndarray  # (H, W) float32, `map` resized bilinearly
    mask: np.ndarray  # (H, W) bool: the post-processed map_size mask, resized by nearest neighbour
    thresholds: Thresholds
    image: np.ndarray  # (H, W, 3) uint8, the input
    map: np.ndarray  # (map_size, map_size) float32
    map_mask: np.ndarray  # (map_size, map_size) bool: `map` thresholded, opened and cleaned of small regions
    display: tuple[float, float]  # the colour range of the map (evaluate's validation maps), for pictures
    post_processing: tuple[int, int]  # (evaluate.opening_kernel, evaluate.min_area) the masks are made with
    score_range: tuple[float, float] | None = None  # the validation image scores' [min, max]: the normalised score's scale

    @property
    def normalized_score(self) -> float | None:
        """anomalib's min-max normalisation, fitted on the validation split: (score - image threshold) / (max - min)
        + 0.5, clipped to [0, 1], so 0.5 is the threshold whatever the method's scale; below 0.5 exactly when the
        label is 0. None when the thresholds file has no score range (fixed thresholds, an older file)."""
        if self.score_range is None:
            return None
        low, high = self.score_range
        value = float(np.clip((self.score - self.thresholds.image) / (high - low) + 0.5, 0.0, 1.0))
        return value if self.label else min(value, float(np.nextafter(0.5, 0.0)))  # rounding must not cross the line

    @property
    def overlay(self) -> Image.Image:
        """The map blended over the image (coloured on `display`), the predicted mask outlined in white."""
        return overlay_at_size(self.image, self.anomaly_map, self.mask, self.display)

    @property
    def mask_image(self) -> Image.Image:
        """The mask as a 0/255 greyscale PNG-ready image."""
        return Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")

    def with_thresholds(self, image: float | None = None, pixel: float | None = None) -> Prediction:
        """The same map decided at other thresholds (None keeps the current one): a new label and mask, no inference."""
        image = self.thresholds.image if image is None else float(image)
        pixel = self.thresholds.pixel if pixel is None else float(pixel)
        if (image, pixel) == (self.thresholds.image, self.thresholds.pixel):
            return self
        chosen = Thresholds(image, pixel, "chosen by hand")
        small = binary_masks(self.map[None], chosen.pixel, *self.post_processing)[0]
        mask = np.asarray(mask_at_size(small, self.image.shape[:2])) > 0
        return replace(self, label=int(self.score >= chosen.image), mask=mask, map_mask=small, thresholds=chosen)

    def summary(self) -> dict[str, Any]:
        """What a JSON line records: score, label, thresholds and where they came from, the mask's area."""
        return {
            "score": self.score,
            "normalized_score": self.normalized_score,
            "label": self.label,
            "image_threshold": self.thresholds.image,
            "pixel_threshold": self.thresholds.pixel,
            "threshold_source": self.thresholds.source,
            "height": int(self.image.shape[0]),
            "width": int(self.image.shape[1]),
            "anomalous_pixels": int(self.mask.sum()),
        }


class TorchScorer:
    """A trained run's model on a device: (uint8 images at `image_size`, category) -> (maps, scores) as numpy, through
    the method's own encode and scorer, the scorer evaluate runs on its stored rows."""

    def __init__(self, method, model, record: dict, cfg: Params, device):
        from d2dprompt.methods.base import Scoring

        self.method, self.model, self.device = method, model, device
        self.image_size = method.input_size(record)
        self._batch_score = method.scorer(model, record, Scoring.of(cfg.evaluate, cfg.loss, cfg.model), device)

    def __call__(self, images: list[np.ndarray], category: str | None) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self._batch_score(self.method.encode(self.model, images, self.device), [category] * len(images))
        return maps.numpy(), scores.numpy()


def exported_settings(manifest: dict, given: Params | None, folder: Path) -> Params:
    """An exported folder's settings: the evaluate block it was exported with, or `given` when it agrees with the keys
    its graphs compute with (a map scale cannot change without exporting again)."""
    from d2dprompt.serve.onnx_backend import BAKED_KEYS

    try:
        exported = params_from_dict({"evaluate": manifest["evaluate"], "loss": manifest["loss"]})
    except ParamsError as err:
        raise ParamsError(f"{folder}: manifest.json: {err}") from None
    if given is None:
        return exported
    baked = {f"evaluate.{k}": (getattr(exported.evaluate, k), getattr(given.evaluate, k)) for k in BAKED_KEYS}
    baked["loss.image_top_percent"] = (exported.loss.image_top_percent, given.loss.image_top_percent)
    for key, (baked_value, asked) in baked.items():
        if baked_value != asked:
            raise ParamsError(f"{folder}: its graphs compute maps with {key}={baked_value!r}, the params file says {asked!r}; "
                              "export again with these params (python -m d2dprompt.export ... --params)")
    return given


class Detector:
    """A trained run (or its exported graphs), its thresholds and its evaluate settings, ready to score images (see the
    module docstring). `backend` scores uint8 images at `image_size`: a TorchScorer, or onnx_backend.OnnxGraphs."""

    def __init__(self, backend, record: dict, cfg: Params, thresholds: Thresholds, display: tuple[float, float], category: str | None,
                 folder: Path, thresholds_file: Path | None = None, check_scale: bool = True):
        from d2dprompt.methods import registry
        from d2dprompt.trained import method_of

        self.backend, self.record, self.cfg, self.folder = backend, record, cfg, folder
        self.thresholds, self.display, self.thresholds_file = thresholds, display, thresholds_file
        self.score_range = score_range_of(thresholds_file)
        self.device = backend.device
        self._method = registry.get(method_of(record))
        self.method = self._method.name
        self.image_size = backend.image_size
        if self._method.scores_together(record):
            raise ValueError(f"{folder}: scores a category's test images against each other (fewshot.mutual: true), which evaluate "
                             "runs; predict and the app score images one by one: train with fewshot.k > 0 for a memory instead")
        self.categories: list[str] = list(record.get("categories", []))
        self.category = category
        if self.categories:  # a run with a model or a class label per category: which one scores
            from d2dprompt.methods.base import category_index

            category_index(record, category, self.method)
        self.check_scale = check_scale
        if check_scale and self.fallback_misreads:
            raise ThresholdsError(f"{folder}: {self.fallback_misreads}")

    @property
    def fallback_misreads(self) -> str | None:
        """Why the thresholds in use cannot decide: the run's maps are not in [0, 1] (feature distances) and a
        threshold fell back to evaluate.sensitivity, which would misread them; None when they can."""
        off_scale = self._method.off_unit_scale(self.record)
        if not off_scale or FALLBACK_SOURCE not in self.thresholds.source:
            return None
        return (f"{off_scale}, so evaluate.sensitivity={self.cfg.evaluate.sensitivity} cannot threshold them, and no thresholds file "
                "was found: pass evaluate's thresholds.json, or both an image and a pixel threshold")

    @property
    def method_object(self):
        """The registry's Method of this run."""
        return self._method

    @property
    def exported(self) -> bool:
        """True when the graphs of an exported folder score (onnxruntime), False for the trained model (PyTorch)."""
        from d2dprompt.serve.onnx_backend import OnnxGraphs

        return isinstance(self.backend, OnnxGraphs)

    def _score(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images at `image_size` -> (maps, scores), as evaluate scores its rows (the method's own inputs)."""
        return self.backend(images, self.category)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        method: str | None = None,
        thresholds: str | Path | None = "auto",
        dataset: str | None = None,
        params: str | Path | None = None,
        category: str | None = None,
        device: str | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        backend: str = "auto",
        threads: int | None = None,
        check_scale: bool = True,
    ) -> Detector:
        """Load a trained run or an exported folder (see the module docstring for `source`).

        thresholds: "auto" (evaluate's file for this run, when there is one), a thresholds.json path, or None for
        `evaluate.sensitivity`; image_threshold / pixel_threshold override either. params: a params.yaml whose
        evaluate and model blocks apply (default: the ones the thresholds were fitted with). category: which of a
        run's '<dataset>/<category>' (draem: its model, decodiff: its class label, patchknn and few-shot d2dprompt: its
        memory; may be left out when the run knows one). device: cpu,
        cuda, cuda:N (default: the params' model.device). backend: "torch" (a trained folder), "onnx" (a folder
        python -m d2dprompt.export wrote, run by onnxruntime; `threads` its intra-op threads) or "auto" (by the folder).
        check_scale: refuse to load a run whose maps are not in [0, 1] when a threshold falls back to
        evaluate.sensitivity (False: the caller passes thresholds with each request and checks `fallback_misreads`).
        """
        from d2dprompt.serve.onnx_backend import OnnxGraphs, is_exported, read_json

        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend={backend!r}: choose auto, torch or onnx")
        given = load_params(Path(params)) if params is not None else None  # a bad file is named first, run or no run
        root, bundled_params = local_source(source)
        folder = trained_folder(root, method, listed_methods(given) if method is None else None)
        exported = is_exported(folder)
        if backend == "onnx" and not exported:
            raise ValueError(f"{folder}: a trained run, not an exported one; export it first: "
                             f"python -m d2dprompt.export {folder} --format onnx --out <folder>")
        if backend == "torch" and exported:
            raise ValueError(f"{folder}: an exported folder (ONNX graphs); score it with the onnx backend (predict --backend onnx)")
        if thresholds == "auto":
            chosen_file = evaluated_thresholds(folder, dataset)
        else:
            chosen_file = Path(thresholds) if thresholds is not None else None
        if exported:
            graphs = OnnxGraphs(folder, device or (given.model.device if given is not None else None), threads)
            cfg = exported_settings(graphs.manifest, given, folder)
            chosen = resolve_thresholds(chosen_file, image_threshold, pixel_threshold, cfg.evaluate, graphs.manifest["method"])
            record = read_json(folder / "model.json", "the source run's record")
            return cls(graphs, record, cfg, chosen, display_of(chosen_file), category, folder, chosen_file, check_scale)
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ValueError(f"{folder}: a trained folder runs in PyTorch, which is not installed: pip install 'd2dprompt[train]', "
                             f"or score its export (python -m d2dprompt.export {folder} --format onnx --out <folder>)") from None
        from d2dprompt.core.models import pick_device
        from d2dprompt.trained import load_trained, read_record

        cfg = given if given is not None else settings(bundled_params, chosen_file, folder)
        chosen = resolve_thresholds(chosen_file, image_threshold, pixel_threshold, cfg.evaluate, read_record(folder)[2].name)
        torch_device = pick_device(device or cfg.model.device)
        model, record, method_ = load_trained(folder)
        method_.place(model, torch_device)
        return cls(TorchScorer(method_, model, record, cfg, torch_device), record, cfg, chosen, display_of(chosen_file), category,
                   folder, chosen_file, check_scale)

    def predict(self, image) -> Prediction:
        """Score one image: a path, encoded bytes, a PIL image or an HxWx3 uint8 array. Example:

        >>> det = Detector.load("stages/train")  # doctest: +SKIP
        >>> det.predict("sample/weave/test/hole/000.png").label  # doctest: +SKIP
        1
        """
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list, batch_size: int | None = None, max_megapixels: float = BYTES_MEGAPIXELS) -> list[Prediction]:
        """Score many images, `batch_size` (default evaluate.batch_size) per forward; results in input order.
        A bad image stops the batch with an ImageError naming it (its path, or `images[i]`); so does encoded bytes
        with more than `max_megapixels` million pixels (read from the header: a decompression bomb is never decoded)."""
        arrays = [check_size(self._name(item, i), rgb_of(item, self._name(item, i), max_megapixels * 1e6), self.image_size)
                  for i, item in enumerate(images)]
        step = batch_size or self.cfg.evaluate.batch_size
        return [p for start in range(0, len(arrays), step) for p in self.predict_arrays(arrays[start : start + step])]

    def predict_arrays(self, originals: list[np.ndarray]) -> list[Prediction]:
        """One forward over uint8 HxWx3 images already checked to be at least `image_size` on each side."""
        ev = self.cfg.evaluate
        maps, scores = self._score([resize_rgb(img, self.image_size) for img in originals])
        masks = binary_masks(maps, self.thresholds.pixel, opening_kernel=ev.opening_kernel, min_area=ev.min_area)
        results = []
        for original, small_map, small_mask, score in zip(originals, maps, masks, scores.tolist()):
            height, width = original.shape[:2]
            full = np.asarray(Image.fromarray(small_map.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR))
            mask = np.asarray(mask_at_size(small_mask, (height, width))) > 0
            results.append(Prediction(
                float(score), int(score >= self.thresholds.image), full, mask, self.thresholds, original,
                small_map.astype(np.float32), small_mask, self.display, (ev.opening_kernel, ev.min_area), self.score_range,
            ))
        return results

    def for_category(self, category: str | None) -> Detector:
        """The same run scoring as `category` (draem: its model; decodiff: its class label; patchknn, few-shot d2dprompt: its memory)."""
        return Detector(self.backend, self.record, self.cfg, self.thresholds, self.display, category, self.folder, self.thresholds_file,
                        self.check_scale)

    @staticmethod
    def _name(item, index: int) -> str:
        return str(item) if isinstance(item, (str, Path)) else f"images[{index}]"

    def __repr__(self) -> str:
        kind = ", onnx" if self.exported else ""
        return f"Detector({self.method}{kind}, {self.folder}, image_size={self.image_size}, thresholds={self.thresholds})"
