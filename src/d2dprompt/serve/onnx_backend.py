"""Scoring from an exported folder (python -m d2dprompt.export) with onnxruntime alone: no torch, diffusers or DVC.

An exported folder holds
    manifest.json          the format, the method, one graph per category (its files and their sha256), the source
                           run's hashes, the evaluate settings the graphs were built with, the parity export measured
    preprocessing.json     how an image becomes a graph's input
    model.json             the source run's record (its method, categories and training blocks)
    thresholds.json        evaluate's fitted thresholds, when the source run had them
    graphs/<i>/model.onnx  one graph (plus its weight files when it passes protobuf's 2 GB)

`Detector.load` reads such a folder through `OnnxGraphs`, which checks the folder against its manifest before a
session opens: every file it names lies inside the folder and has the sha256 recorded, graph i is the graph of the
record's category i in graphs/i/, and both JSON files have their keys. A graph, a record, thresholds or preprocessing
that are not the ones exported are refused, not run. The hashes sit in the same folder: they catch damage and
mix-ups, not someone who rewrites the manifest too (a checksum, not a signature).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MANIFEST, PREPROCESSING = "manifest.json", "preprocessing.json"
FORMAT, FORMAT_VERSION = "d2dprompt-onnx", 2  # 2: every file hashed, graphs bound to their categories
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


# the manifest's keys the readers use, with their JSON types
MANIFEST_KEYS = {"method": str, "graphs": list, "files": dict, "evaluate": dict, "loss": dict, "thresholds": dict}
RECORD, THRESHOLDS = "model.json", "thresholds.json"


def _checked_file(folder: Path, name: object, expected: object, manifest: Path) -> Path:
    """`folder / name` when `name` is a plain file name, the file is there and has the sha256 `expected`."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ExportedError(f"{manifest}: {name!r} is not a file name inside the folder; export again")
    path = folder / name
    if not path.is_file() or path.is_symlink():
        raise ExportedError(f"{path}: missing (listed in {manifest}); export again")
    if sha256_file(path) != expected:
        raise ExportedError(f"{path}: sha256 differs from the one {manifest} records: not the exported file; export again")
    return path


def read_manifest(folder: Path) -> dict:
    """manifest.json, checked: its format and keys, every file it names against its sha256 and inside the folder,
    and graph i as the graph of the record's category i in graphs/i/."""
    folder = Path(folder)
    where = folder / MANIFEST
    manifest = read_json(where, "the graphs' list and hashes")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportedError(f"{where}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
                            f"this package reads {FORMAT!r} version {FORMAT_VERSION}: export again with it")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise ExportedError(f"{where}: '{key}' must be a JSON {'list' if kind is list else 'object' if kind is dict else 'string'} "
                                "(export writes it); export again")
    for name in (RECORD, PREPROCESSING, *([THRESHOLDS] if (folder / THRESHOLDS).exists() else [])):
        if name not in manifest["files"]:
            raise ExportedError(f"{where}: 'files' does not hash {name}; export again")
    for name, expected in manifest["files"].items():
        _checked_file(folder, name, expected, where)
    categories = read_json(folder / RECORD, "the source run's record").get("categories") or [None]
    graphs = manifest["graphs"]
    if len(graphs) != len(categories):
        raise ExportedError(f"{where}: {len(graphs)} graphs for the {len(categories)} categories of {RECORD}; export again")
    for index, (graph, category) in enumerate(zip(graphs, categories)):
        if not (isinstance(graph, dict) and graph.get("category") == category and graph.get("folder") == f"graphs/{index}"
                and isinstance(graph.get("files"), dict) and graph.get("graph") in graph["files"]):
            raise ExportedError(f"{where}: graphs[{index}] must be the graph of {category or 'the run'} in graphs/{index}/, "
                                "its file among its hashed files; export again")
        for name, expected in graph["files"].items():
            _checked_file(folder / graph["folder"], name, expected, where)
    return manifest


def check_preprocessing(preprocessing: dict, path: Path) -> int:
    """The input side preprocessing.json gives, checked."""
    side = preprocessing.get("side")
    if not isinstance(side, int) or isinstance(side, bool) or side < 1:
        raise ExportedError(f"{path}: 'side' must be a whole number of pixels >= 1, got {side!r}; export again")
    return side


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
        self.image_size = check_preprocessing(self.preprocessing, self.folder / PREPROCESSING)
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
