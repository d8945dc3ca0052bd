"""Scoring from an exported folder (python -m d2dprompt.export) with onnxruntime alone: no torch, diffusers or DVC.

An exported folder holds
    manifest.json          the format, the method, one graph per category (its files and their sha256), the source
                           run's hashes, the evaluate settings the graphs were built with, the parity export measured
    preprocessing.json     how an image becomes a graph's input
    model.json             the source run's record (its method, categories and training blocks)
    thresholds.json        evaluate's fitted thresholds, when the source run had them
    graphs/<i>/model.onnx  one graph (plus its weight files when it passes protobuf's 2 GB)

`Detector.load` reads such a folder through `OnnxGraphs`, which checks every graph file against the manifest before
a session opens: a graph that is not the one exported is refused, not run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MANIFEST, PREPROCESSING = "manifest.json", "preprocessing.json"
FORMAT, FORMAT_VERSION = "d2dprompt-onnx", 1
INPUT, OUTPUTS = "pixels", ("maps", "scores")
BAKED_KEYS = ("map_size", "sigma", "score", "top_percent")  # evaluate keys computed inside the graphs
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ExportedError(ValueError):
    """An exported folder that is incomplete, altered, or of another format version."""


def is_exported(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ExportedError(f"{path}: missing; not a complete export (python -m d2dprompt.export writes {what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportedError(f"{path}: not valid JSON ({err}); export again") from None
    if not isinstance(data, dict):
        raise ExportedError(f"{path}: expected a JSON object ({what})")
    return data


def read_manifest(folder: Path) -> dict:
    """manifest.json, its format checked and every graph file's sha256 compared with the one it records."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, "the graphs' list and hashes")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportedError(f"{folder / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
                            f"this package reads {FORMAT!r} version {FORMAT_VERSION}: export again with it")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, list) or not graphs:
        raise ExportedError(f"{folder / MANIFEST}: 'graphs' must list the exported graphs")
    for graph in graphs:
        for name, expected in graph["files"].items():
            path = folder / graph["folder"] / name
            if not path.is_file():
                raise ExportedError(f"{path}: missing (listed in {folder / MANIFEST}); export again")
            if sha256_file(path) != expected:
                raise ExportedError(f"{path}: sha256 differs from the one {folder / MANIFEST} records: not the exported graph; export again")
    return manifest


def to_pixels(images: list[np.ndarray]) -> np.ndarray:
    """uint8 HxWx3 images at the input side -> (B, 3, S, S) float32 in [0, 1]: the graphs' input (preprocessing.json)."""
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255)


def providers_for(device: str | None) -> list[str]:
    """onnxruntime's execution providers for a device name: cpu; cuda (CUDA first, CPU for what it lacks); auto or
    None = cuda where this onnxruntime has it, else cpu."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    kind = (device or "auto").split(":")[0]
    if kind == "auto":
        kind = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if kind not in PROVIDERS:
        raise ValueError(f"device={device!r}: an exported folder runs on cpu, cuda or auto")
    if PROVIDERS[kind] not in available:
        raise ValueError(f"device={device!r}: this onnxruntime has no {PROVIDERS[kind]} (it has {', '.join(available)}); "
                         "install onnxruntime-gpu for cuda")
    return [PROVIDERS[kind]] + ([PROVIDERS["cpu"]] if kind != "cpu" else [])


class OnnxGraphs:
    """An exported folder's graphs: `(uint8 images at image_size, category) -> (maps, scores)` as float32 numpy arrays,
    one onnxruntime session per category, opened when first asked for."""

    def __init__(self, folder: Path, device: str | None = None, threads: int | None = None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportedError(f"{folder}: an exported folder runs with onnxruntime, which is not installed: "
                                "pip install 'd2dprompt[onnx]'") from None
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.preprocessing = read_json(self.folder / PREPROCESSING, "the input's description")
        self.image_size = int(self.preprocessing["side"])
        self.providers, self.threads = providers_for(device), threads
        self.device = self.providers[0].removesuffix("ExecutionProvider").lower()
        self._sessions: dict[str, object] = {}

    def graph_of(self, category: str | None) -> dict:
        """The manifest entry scoring `category`: the one graph of a run without categories, else that category's
        (chosen as the trained run chooses its model: base.category_index)."""
        from d2dprompt.methods.base import category_index

        graphs = self.manifest["graphs"]
        if graphs[0]["category"] is None:
            return graphs[0]
        return graphs[category_index({"categories": [g["category"] for g in graphs]}, category, self.manifest["method"])]

    def session(self, category: str | None):
        graph = self.graph_of(category)
        if graph["folder"] not in self._sessions:
            path = self.folder / graph["folder"] / graph["graph"]
            self._sessions[graph["folder"]] = self.session_for(path, self.providers, self.threads)
        return self._sessions[graph["folder"]]

    @staticmethod
    def session_for(path: Path, providers: list[str] | None = None, threads: int | None = None):
        """An onnxruntime session on one graph file (CPU unless `providers` say otherwise; `threads` 0/None = its default)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        return onnxruntime.InferenceSession(str(path), options, providers=providers or [PROVIDERS["cpu"]])

    def __call__(self, images: list[np.ndarray], category: str | None) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session(category).run(list(OUTPUTS), {INPUT: to_pixels(images)})
        return maps.astype(np.float32), scores.astype(np.float32)
