"""The compare stage (pipeline/compare.py) on evaluate outputs built here with evaluate's own per-category code: a
method that separates perfectly beats a random one with p < 0.01, two identical methods differ by 0 with p = 1, rows
that differ and replicas drawn under other params are refused, and no map is read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

from d2dprompt.core.data.evaluated import MAPS_FILE, REPLICAS_FILE, write_evaluated, write_replicated
from d2dprompt.core.eval.thresholds import Thresholds
from d2dprompt.params import load_params
from d2dprompt.pipeline.evaluate import category_metrics
from tests.conftest import stage, write_params

SIDE = 64  # 10 normal images per category: 40960 normal pixels reach the FPR range set below
PER_CLASS = 10


def synthetic_rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, labels, masks = [], [], []
    for category in ("disc", "tile"):
        for i in range(2 * PER_CLASS):
            anomalous = i >= PER_CLASS
            mask = np.zeros((SIDE, SIDE), dtype=bool)
            if anomalous:
                y, x = rng.integers(8, SIDE - 16, 2)
                mask[y : y + 8 + i, x : x + 8] = True
            rows.append(SimpleNamespace(image_path=f"{category}/test/{'crack' if anomalous else 'good'}/{i:03d}.png", category=category))
            labels.append(int(anomalous))
            masks.append(mask)
    return rows, np.array(labels), np.stack(masks), rng


EVALUATE = {"aupimo_fpr": [1.0e-3, 1.0e-2], "bootstrap": 500}


def write_method(root: Path, name: str, rows, labels, scores, maps, masks, evaluate: dict = EVALUATE) -> Path:
    """What evaluate writes for these maps: the maps file and, from evaluate's own per-category code, the replicas."""
    folder = root / "stages/evaluate" / name / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    ev = load_params(write_params(folder, evaluate=evaluate)).evaluate
    (folder / "params.yaml").unlink()
    write_evaluated(folder / MAPS_FILE, rows, labels, scores, maps, masks)
    _, replicated = category_metrics(rows, labels, scores, masks, maps, np.zeros_like(masks), Thresholds(0.5, 0.5, "fixed"), ev)
    write_replicated(folder / REPLICAS_FILE, replicated)
    return folder / REPLICAS_FILE


def params(root: Path, methods: list[str]) -> None:
    path = write_params(root, evaluate=EVALUATE)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "methods": methods}))


def test_compare_pairs_methods_with_paired_intervals_and_p_values(tmp_path):
    rows, labels, masks, rng = synthetic_rows()
    perfect_maps = (masks + 0.2 * rng.random(masks.shape)).astype(np.float32)
    perfect_scores = perfect_maps.reshape(len(rows), -1).max(axis=1)
    write_method(tmp_path, "d2dprompt", rows, labels, perfect_scores, perfect_maps, masks)
    write_method(tmp_path, "d2d", rows, labels, rng.random(len(rows)), rng.random(masks.shape).astype(np.float32), masks)
    write_method(tmp_path, "anomalyclip", rows, labels, perfect_scores, perfect_maps, masks)  # the same as d2dprompt
    params(tmp_path, ["d2dprompt", "d2d", "anomalyclip"])

    done = stage("compare", "sample", cwd=tmp_path)
    record = json.loads((tmp_path / "metrics/compare/sample.json").read_text())
    assert record["methods"] == ["d2dprompt", "d2d", "anomalyclip"] and record["resamples"] == 500
    assert set(record["pairs"]) == {"d2dprompt - d2d", "d2dprompt - anomalyclip", "d2d - anomalyclip"}
    metrics = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "AUPIMO")
    for category in ("disc", "tile", "mean"):
        better = record["pairs"]["d2dprompt - d2d"][category]
        same = record["pairs"]["d2dprompt - anomalyclip"][category]
        for name in metrics:  # per category 20 images; the mean stands on both categories' images
            assert better[name]["diff"] > 0 and better[name]["lo"] > 0 and better[name]["p_value"] < (0.01 if category == "mean" else 0.05), (category, name, better[name])
            covered = {"categories": 2} if category == "mean" else {}  # a mean says how many categories it averages
            assert same[name] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0, **covered}, (category, name)
    assert record["means"]["d2dprompt"]["image_AUROC"] == 1.0
    table = (tmp_path / "metrics/compare/sample.md").read_text()
    assert "cannot tell the two methods apart" in table and "| d2dprompt - anomalyclip | +0.000 [+0.000, +0.000] p=1.000 (=)" in table
    assert "d2dprompt - d2d: image_AUROC +" in done.stdout

    plots = tmp_path / "stages/compare/sample"
    per_image = (plots / "aupimo.csv").read_text().splitlines()
    assert per_image[0] == "method,category,image_path,aupimo" and len(per_image) == 1 + 3 * 2 * PER_CLASS  # anomalous images only
    differences = (plots / "differences.csv").read_text().splitlines()
    assert differences[0] == "pair,metric,diff,lo,hi,p_value,categories" and len(differences) == 1 + 3 * len(metrics)


def test_compare_refuses_methods_scored_on_other_rows_and_says_when_there_is_one_method(tmp_path):
    rows, labels, masks, rng = synthetic_rows()
    maps = rng.random(masks.shape).astype(np.float32)
    first = write_method(tmp_path, "d2dprompt", rows, labels, rng.random(len(rows)), maps, masks)
    order = list(range(len(rows)))[::-1]
    second = write_method(tmp_path, "draem", [rows[i] for i in order], labels[order], rng.random(len(rows)), maps[order], masks[order])
    params(tmp_path, ["d2dprompt", "draem"])
    failed = stage("compare", "sample", cwd=tmp_path, check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == f"error: {second.relative_to(tmp_path)} and {first.relative_to(tmp_path)}: scored different test rows; rerun both evaluate stages on the same latents"

    params(tmp_path, ["d2dprompt"])
    alone = stage("compare", "sample", cwd=tmp_path)
    assert "one method listed (d2dprompt), nothing to compare" in alone.stdout
    assert "nothing to compare" in (tmp_path / "metrics/compare/sample.md").read_text()
    assert json.loads((tmp_path / "metrics/compare/sample.json").read_text())["pairs"] == {}


def test_compare_needs_resamples_and_its_replicas_files(tmp_path):
    rows, labels, masks, rng = synthetic_rows()
    write_method(tmp_path, "d2dprompt", rows, labels, rng.random(len(rows)), rng.random(masks.shape).astype(np.float32), masks)
    path = write_params(tmp_path, evaluate={"bootstrap": 0})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "methods": ["d2dprompt", "draem"]}))
    failed = stage("compare", "sample", cwd=tmp_path, check=False)
    assert failed.returncode == 1 and "evaluate.bootstrap: 0 gives no intervals to compare with" in failed.stderr
    params(tmp_path, ["d2dprompt", "draem"])
    failed = stage("compare", "sample", cwd=tmp_path, check=False)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1] == (
        "error: stages/evaluate/draem/sample/replicas.safetensors: not found; run the evaluate stage of this method and dataset first")
    (tmp_path / "stages/evaluate/draem/sample").mkdir(parents=True)
    (tmp_path / "stages/evaluate/draem/sample/replicas.safetensors").write_bytes(b"not safetensors")
    failed = stage("compare", "sample", cwd=tmp_path, check=False)
    assert failed.returncode == 1 and "replicas.safetensors: not an evaluate replicas file" in failed.stderr and "Traceback" not in failed.stderr


def test_compare_reads_no_map_and_refuses_replicas_drawn_under_other_params(tmp_path):
    """compare pairs what evaluate already computed: with every maps file gone it gives the very same record; a
    method evaluated with another bootstrap seed drew other resamples, so pairing it would be wrong, and is refused."""
    rows, labels, masks, rng = synthetic_rows()
    maps = (masks + 0.5 * rng.random(masks.shape)).astype(np.float32)
    other = rng.random(masks.shape).astype(np.float32)
    write_method(tmp_path, "d2dprompt", rows, labels, maps.max(axis=(1, 2)), maps, masks)
    write_method(tmp_path, "draem", rows, labels, other.max(axis=(1, 2)), other, masks)
    params(tmp_path, ["d2dprompt", "draem"])
    stage("compare", "sample", cwd=tmp_path)
    first = (tmp_path / "metrics/compare/sample.json").read_bytes()
    for found in (tmp_path / "stages/evaluate").rglob(MAPS_FILE):
        found.unlink()
    stage("compare", "sample", cwd=tmp_path)
    assert (tmp_path / "metrics/compare/sample.json").read_bytes() == first

    write_method(tmp_path, "draem", rows, labels, other.max(axis=(1, 2)), other, masks, {**EVALUATE, "bootstrap_seed": 7})
    failed = stage("compare", "sample", cwd=tmp_path, check=False)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1] == (
        "error: stages/evaluate/draem/sample/replicas.safetensors: replicas drawn with seed 7, params.yaml says 0; "
        "rerun the evaluate stage with params.yaml")


def test_a_maps_and_a_replicas_file_have_the_same_bytes_each_time_the_same_rows_are_written(tmp_path):
    """safetensors writes its metadata map in a random order: with more than one key, identical runs would write
    different bytes and dvc.lock would differ between them (README "Reproducibility")."""
    rows, labels, masks, rng = synthetic_rows()
    maps = rng.random(masks.shape, dtype=np.float32)
    scores = maps.max(axis=(1, 2))
    written = set()
    for i in range(16):
        path = write_method(tmp_path / str(i), "d2dprompt", rows, labels, scores, maps, masks, {**EVALUATE, "bootstrap": 100})
        written.add((path.read_bytes(), (path.parent / MAPS_FILE).read_bytes()))
    assert len(written) == 1


def test_a_mean_difference_averages_only_categories_defined_for_both_methods(tmp_path):
    """Identical maps on disc; on tile the second method's normal maps are flat, so its AUPIMO is undefined there.
    The mean AUPIMO difference must stand on disc alone (0, p = 1, over 1/2 categories): it averaged disc and tile
    for the first method but disc alone for the second, and reported a clear difference where there is none."""
    rows, labels, masks, rng = synthetic_rows()
    maps = (masks + 0.5 * rng.random(masks.shape)).astype(np.float32)
    flat = maps.copy()
    on_tile = np.array([row.category == "tile" for row in rows])
    flat[on_tile & (labels == 0)] = 0.25
    scores = maps.reshape(len(rows), -1).max(axis=1)
    write_method(tmp_path, "d2dprompt", rows, labels, scores, maps, masks)
    write_method(tmp_path, "anomalyclip", rows, labels, scores, flat, masks)
    params(tmp_path, ["d2dprompt", "anomalyclip"])

    stage("compare", "sample", cwd=tmp_path)
    record = json.loads((tmp_path / "metrics/compare/sample.json").read_text())
    pair = record["pairs"]["d2dprompt - anomalyclip"]
    assert record["means"]["anomalyclip"]["AUPIMO"] == record["means"]["anomalyclip"]["AUPIMO"]  # defined on disc
    assert "AUPIMO" not in pair["tile"] or pair["tile"]["AUPIMO"]["diff"] is None
    assert pair["mean"]["AUPIMO"]["categories"] == 1 and pair["mean"]["AUPIMO"]["diff"] == 0.0 and pair["mean"]["AUPIMO"]["p_value"] == 1.0
    assert pair["mean"]["image_AUROC"]["categories"] == 2
    table = (tmp_path / "metrics/compare/sample.md").read_text()
    assert "over 1/2 categories" in table
    why = "AUPIMO n/a for tile: maps: the normal images' scores are all equal (0.25); PIMO needs a score range"
    assert record["notes"] == {"anomalyclip": [why]} and f"- anomalyclip: {why}" in table
