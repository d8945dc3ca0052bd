"""The predict CLI on an untrained tiny prompt folder: outputs, bad files, thresholds and their precedence, resuming."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from d2dprompt.core import models as core_models
from d2dprompt import trained as prompt_files
from d2dprompt.core.runtime.config import EvaluateParams
from d2dprompt.params import Params
from d2dprompt.serve.detector import FALLBACK_SOURCE, ThresholdsError, resolve_thresholds
from d2dprompt.pipeline.predict import IMAGE_SUFFIXES, app, find_images, output_stems
from d2dprompt.core.training import write_trained
from d2dprompt.methods import registry
from d2dprompt.methods.base import config_record
from d2dprompt.methods.d2dprompt.model import build_segmenter
from tests.conftest import ROOT

SAMPLE = ROOT / "sample"
SCRATCH = SAMPLE / "disc" / "test" / "scratch" / "000.png"  # 160 x 160, unlike the model's 64


@pytest.fixture(scope="module")
def prompts_dir(tiny, tmp_path_factory) -> Path:
    cfg = Params()
    cfg.model.image_size = 64
    cfg.prompt.depth = 2  # fewer compound layers: faster, and quality does not matter here
    folder = tmp_path_factory.mktemp("train")
    segmenter = build_segmenter(tiny, cfg.prompt, cfg.attention, cfg.model)
    write_trained(folder, segmenter.prompts.state_dict(), config_record(registry.get("d2dprompt"), cfg), [])
    return folder


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump({"model": {"device": "cpu"}, "evaluate": {"map_size": 64, "sigma": 2.0, "min_area": 4}}))
    return path


@pytest.fixture(autouse=True)
def _reuse_tiny(tiny, monkeypatch):
    """The CLI would rebuild the same tiny stack from its seed; reuse the session's copy."""
    monkeypatch.setattr(core_models, "load_frozen", lambda pretrained, seed=0: tiny)


def run(args: list[str], prompts_dir: Path, params_file: Path):
    result = CliRunner().invoke(app, [*map(str, args), "--prompts", str(prompts_dir), "--params", str(params_file)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def read_jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_single_image(prompts_dir, params_file, tmp_path):
    out = tmp_path / "out"
    result = run([SCRATCH, "--out", out], prompts_dir, params_file)
    assert result.exit_code == 0, result.output
    (row,) = read_jsonl(out)
    assert row["image"] == str(SCRATCH) and row["key"] == "000.png"
    assert row["threshold_source"] == FALLBACK_SOURCE
    assert row["image_threshold"] == row["pixel_threshold"] == EvaluateParams().sensitivity
    assert row["label"] == int(row["score"] >= row["image_threshold"])
    mask = np.asarray(Image.open(row["mask"]))
    assert mask.shape == (160, 160) and set(np.unique(mask)) <= {0, 255}
    overlay = Image.open(row["overlay"])
    assert overlay.width > 2 * overlay.height  # three panels side by side
    assert (out / "errors.txt").read_text() == ""
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def make_folder(root: Path) -> Path:
    inputs = root / "in"
    for key, src in zip(GOOD, [SCRATCH, SAMPLE / "tile/test/good/000.png", SAMPLE / "weave/test/color/000.png"]):
        (inputs / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, inputs / key)
    data = SCRATCH.read_bytes()
    (inputs / "a/truncated.png").write_bytes(data[: len(data) // 2])
    (inputs / "notes.png").write_text("not an image\n")
    (inputs / "readme.txt").write_text("skipped: not an image suffix\n")
    return inputs


GOOD = ["a/000.png", "a/b/001.png", "c.png"]
SUFFIXES = ", ".join(sorted(IMAGE_SUFFIXES))


@pytest.fixture(scope="module")
def folder_run(prompts_dir, params_file, tiny, tmp_path_factory):
    """One folder prediction with the fallback thresholds, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("folder")
    inputs, out = make_folder(root), root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core_models, "load_frozen", lambda pretrained, seed=0: tiny)
        result = run([inputs, "--out", out, "--batch-size", "2"], prompts_dir, params_file)
    return inputs, out, result


def test_folder_skips_unreadable_files(folder_run):
    inputs, out, result = folder_run
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["key"] for r in rows] == sorted(GOOD)
    for row in rows:
        assert Path(row["mask"]) == out / f"{row['key'][:-4]}_mask.png"
        assert Path(row["overlay"]).is_file()
        assert Image.open(row["mask"]).size == Image.open(row["image"]).size
    errors = (out / "errors.txt").read_text().splitlines()
    assert len(errors) == 3
    assert errors[0].startswith(str(inputs / "a/truncated.png")) and errors[1].startswith(str(inputs / "notes.png"))
    assert errors[2] == f"{inputs / 'readme.txt'}: not an image file (suffix '.txt'; predict reads {SUFFIXES})"
    assert "truncated.png" in result.stderr and "notes.png" in result.stderr
    assert "3 of 5 images" in result.stdout


def test_same_pixels_give_the_same_score_under_any_name(folder_run, prompts_dir, params_file, tmp_path):
    """The noise is the seed's one draw: a score depends on the pixels, not on the file's name or folder."""
    inputs, out, _ = folder_run
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for i, key in enumerate(sorted(GOOD)):
        shutil.copy(inputs / key, moved / f"renamed{i}.png")
    run([moved, "--out", tmp_path / "out"], prompts_dir, params_file)
    assert np.allclose([r["score"] for r in read_jsonl(out)], [r["score"] for r in read_jsonl(tmp_path / "out")], rtol=0, atol=1e-5)


def test_thresholds_file_and_overrides(folder_run, prompts_dir, params_file, tmp_path):
    inputs, out, _ = folder_run
    scores = sorted(r["score"] for r in read_jsonl(out))
    middle = (scores[0] + scores[1]) / 2  # one image below, two above
    file = tmp_path / "thresholds.json"
    file.write_text(json.dumps({"image": middle, "pixel": -1.0, "source": "F1-optimal on validation"}))

    run([inputs, "--out", tmp_path / "fitted", "--thresholds", file], prompts_dir, params_file)
    rows = read_jsonl(tmp_path / "fitted")
    assert sorted(r["label"] for r in rows) == [0, 1, 1]
    assert all(r["image_threshold"] == middle and r["pixel_threshold"] == -1.0 for r in rows)
    assert all(r["threshold_source"] == f"{file} (F1-optimal on validation)" for r in rows)
    assert all(np.asarray(Image.open(r["mask"])).min() == 255 for r in rows)  # every pixel above -1

    args = [inputs, "--out", tmp_path / "override", "--thresholds", file, "--image-threshold", "2", "--pixel-threshold", "2"]
    run(args, prompts_dir, params_file)
    rows = read_jsonl(tmp_path / "override")
    assert all(r["label"] == 0 for r in rows)  # no score reaches 2
    assert all(r["threshold_source"] == "image: --image-threshold; pixel: --pixel-threshold" for r in rows)
    assert all(np.asarray(Image.open(r["mask"])).max() == 0 for r in rows)  # no pixel reaches 2


def test_thresholds_file_fitted_elsewhere_is_refused(prompts_dir, params_file, tmp_path):
    file = tmp_path / "thresholds.json"
    file.write_text(json.dumps({"image": 0.5, "pixel": 0.5, "score": "max"}))
    result = run([SCRATCH, "--out", tmp_path / "out", "--thresholds", file], prompts_dir, params_file)
    assert result.exit_code == 1
    expected = f"error: {file}: fitted with score='max' but evaluate.score={EvaluateParams().score!r}"
    assert result.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def test_missing_input_exits_1_with_one_line(prompts_dir, params_file, tmp_path):
    missing = tmp_path / "nope.png"
    result = run([missing, "--out", tmp_path / "out"], prompts_dir, params_file)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such file or folder"]


def test_nothing_readable_exits_1(prompts_dir, params_file, tmp_path):
    bad = tmp_path / "in" / "bad.png"
    bad.parent.mkdir()
    bad.write_text("text")
    result = run([bad.parent, "--out", tmp_path / "out"], prompts_dir, params_file)
    assert result.exit_code == 1
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == ""
    assert (tmp_path / "out" / "errors.txt").read_text().startswith(str(bad))


def test_threshold_precedence(tmp_path):
    ev = EvaluateParams(sensitivity=0.3)
    fallback = resolve_thresholds(None, None, None, ev)
    assert (fallback.image, fallback.pixel, fallback.source) == (0.3, 0.3, FALLBACK_SOURCE)
    file = tmp_path / "t.json"
    file.write_text(json.dumps({"image": 0.7, "pixel": 0.6}))
    mixed = resolve_thresholds(file, None, 0.1, ev)
    assert (mixed.image, mixed.pixel) == (0.7, 0.1)
    assert mixed.source == f"image: {file}; pixel: --pixel-threshold"
    partial = resolve_thresholds(None, 0.9, None, ev)
    assert (partial.image, partial.pixel) == (0.9, 0.3)
    assert partial.source == f"image: --image-threshold; pixel: {FALLBACK_SOURCE}"
    file.write_text(json.dumps({"image": 0.7}))
    with pytest.raises(ThresholdsError, match=r"t\.json: key 'pixel'"):
        resolve_thresholds(file, None, None, ev)
    file.write_text("{not json")
    with pytest.raises(ThresholdsError, match=r"t\.json: not valid JSON"):
        resolve_thresholds(file, None, None, ev)


def test_output_stems_keep_colliding_names_apart():
    stems = output_stems(["x/a.png", "x/a.jpg", "x/b.png", "noext"])
    assert stems == {"x/a.png": "x/a.png", "x/a.jpg": "x/a.jpg", "x/b.png": "x/b", "noext": "noext"}


def test_find_images_skips_the_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    for name in ("b.PNG", "a.jpg", "out/a_overlay.png", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [i.key for i in find_images(tmp_path, exclude=tmp_path / "out")] == ["a.jpg", "b.PNG"]
    with pytest.raises(FileNotFoundError, match="no images"):
        find_images(tmp_path / "out", exclude=tmp_path / "out")


def test_thresholds_of_another_method_are_refused(tmp_path):
    from d2dprompt.serve.detector import ThresholdsError, read_thresholds_file

    ev = EvaluateParams()
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"image": 0.5, "pixel": 0.5, "method": "anomalyclip", "score": "anomalyclip"}))
    assert read_thresholds_file(path, ev, "anomalyclip")["image"] == 0.5  # its own score, not evaluate.score
    with pytest.raises(ThresholdsError, match="fitted for method 'anomalyclip', not for the 'd2dprompt' run"):
        read_thresholds_file(path, ev, "d2dprompt")
    path.write_text(json.dumps({"image": 0.5, "pixel": 0.5, "method": "d2d", "score": "max"}))
    with pytest.raises(ThresholdsError, match="fitted with score='max' but evaluate.score='fused'"):
        read_thresholds_file(path, ev, "d2d")


def test_a_rerun_resumes_only_what_is_still_valid(prompts_dir, params_file, tmp_path):
    """Lines of a killed run are reused when run, thresholds and image file are unchanged; the rest is redone."""
    inputs, out = make_folder(tmp_path), tmp_path / "out"
    first = run([inputs, "--out", out, "--workers", "0"], prompts_dir, params_file)
    assert first.exit_code == 0 and "resumed" not in first.output
    complete = read_jsonl(out)
    # what a kill leaves: no predictions.jsonl, a partial file with two finished lines and a cut one
    partial = out / "predictions.partial-0.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in complete[:2]) + json.dumps(complete[2])[:25])
    (out / "predictions.jsonl").unlink()
    kept = {r["key"]: Path(r["mask"]).stat().st_mtime_ns for r in complete[:2]}
    again = run([inputs, "--out", out, "--workers", "0"], prompts_dir, params_file)
    assert again.exit_code == 0 and "resumed: 2 of 5 images" in again.output, again.output
    assert {r["key"]: Path(r["mask"]).stat().st_mtime_ns for r in read_jsonl(out)[:2]} == kept  # not redone
    # the rerun scores the other 3 in a smaller batch; fp32 kernels move a score by ~1e-6 with the batch size
    assert [(r["key"], pytest.approx(r["score"], abs=1e-5)) for r in read_jsonl(out)] == [(r["key"], r["score"]) for r in complete]
    assert not partial.exists()
    # other thresholds: nothing reused; a changed image file: that one redone
    other = run([inputs, "--out", out, "--pixel-threshold", "0.9"], prompts_dir, params_file)
    assert "resumed" not in other.output and {r["pixel_threshold"] for r in read_jsonl(out)} == {0.9}
    shutil.copy(SAMPLE / "disc/test/good/000.png", inputs / "c.png")
    changed = run([inputs, "--out", out, "--pixel-threshold", "0.9"], prompts_dir, params_file)
    assert "resumed: 2 of 5 images" in changed.output, changed.output


def test_a_killed_process_resumes_without_redoing_finished_images(prompts_dir, params_file, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(24):
        shutil.copy(SCRATCH, inputs / f"{i:03d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "d2dprompt.pipeline.predict", str(inputs), "--trained", str(prompts_dir), "--params", str(params_file),
           "--out", str(out), "--batch-size", "1", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / "predictions.partial-0.jsonl"
    deadline = time.monotonic() + 300
    while not (partial.is_file() and partial.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "predict ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20  # its DataLoader worker dies with it, not left behind blocked on a queue
    while [p for p in psutil.process_iter(["cmdline"]) if str(inputs) in " ".join(p.info["cmdline"] or [])]:
        assert time.monotonic() < deadline, "a DataLoader worker outlived the killed predict"
        time.sleep(0.2)
    finished = partial.read_text().count("\n")
    assert not (out / "predictions.jsonl").exists() and finished < 24
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = int(re.search(r"resumed: (\d+) of 24 images", rerun.stdout).group(1))
    assert resumed >= finished  # every finished line is reused (a line may have landed after the count)
    rows = read_jsonl(out)
    assert [r["key"] for r in rows] == [f"{i:03d}.png" for i in range(24)]
    assert len({round(r["score"], 6) for r in rows}) == 1  # the same pixels: one score, resumed or not


@pytest.mark.parametrize("where", ["a file", "read-only"])
def test_an_out_that_cannot_hold_predictions_stops_with_one_line(prompts_dir, params_file, tmp_path, where):
    out = tmp_path / "taken.txt" if where == "a file" else Path("/proc/d2d-predictions")  # /proc refuses new folders, root or not
    if where == "a file":
        out.write_text("not a folder")
    result = run([SCRATCH, "--out", out], prompts_dir, params_file)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {out}"), result.stderr
    assert ("is a file, not a folder" if where == "a file" else "cannot") in lines[0]


def _broken_copy(prompts_dir: Path, tmp_path: Path, name: str, content: str | bytes) -> Path:
    folder = tmp_path / "trained"
    shutil.copytree(prompts_dir, folder)
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.mark.parametrize("name, content, said", [
    ("model.safetensors", b"PK\x03\x04 a zip, not weights", "model.safetensors: not a safetensors file"),
    ("model.json", "[]", "model.json: must be a JSON object of params blocks"),
    ("model.json", "{not json", "model.json: not valid JSON"),
    ("model.json", json.dumps({"method": "d2dprompt", "model": None}), "model.json: model: must be a mapping of keys"),
])
def test_a_damaged_trained_folder_stops_with_one_line_naming_the_file(prompts_dir, params_file, tmp_path, name, content, said):
    folder = _broken_copy(prompts_dir, tmp_path, name, content)
    result = CliRunner().invoke(app, [str(SCRATCH), "--out", str(tmp_path / "out"), "--prompts", str(folder), "--params", str(params_file)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, said", [
    ({"categories": 5}, "model.json: categories: must be a list of '<dataset>/<category>' names (train writes it), got 5"),
    ({"categories": "sample/disc"}, 'model.json: categories: must be a list of \'<dataset>/<category>\' names (train writes it), got "sample/disc"'),
    ({"memory": 3}, "model.json: memory: must be a mapping of categories (train writes it), got 3"),
    ({"model": {}}, None),  # every key at its default: loads (it was a KeyError traceback)
])
def test_a_record_is_checked_with_the_schema_that_wrote_it(prompts_dir, params_file, tmp_path, change, said):
    """A TypeError traceback before, or a category menu of single letters ("choose --category from s | a | m ...")."""
    record = json.loads((prompts_dir / "model.json").read_text())
    folder = _broken_copy(prompts_dir, tmp_path, "model.json", json.dumps({**record, **change}))
    result = CliRunner().invoke(app, [str(SCRATCH), "--out", str(tmp_path / "out"), "--prompts", str(folder), "--params", str(params_file)])
    lines = result.stderr.strip().splitlines()
    if said is None:
        assert result.exit_code == 0, result.stderr
    else:
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], result.stderr


@pytest.mark.parametrize("shown", ["wide", [0.5], [1.0, 0.0], [0.0, None]])
def test_a_thresholds_file_with_a_bad_display_range_is_refused(prompts_dir, params_file, tmp_path, shown):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"image": 0.5, "pixel": 0.5, "display_range": shown}))
    result = run([SCRATCH, "--out", tmp_path / "out", "--thresholds", path], prompts_dir, params_file)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and lines == [f"error: {path}: key 'display_range' must be two finite numbers [low, high] with low <= high, got {shown!r}"]
