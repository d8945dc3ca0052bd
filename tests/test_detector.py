"""The Python API (detector.py): inputs it accepts, thresholds it finds, and evaluate's score for a sample image."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2dprompt.serve.detector import Detector, Prediction, ThresholdsError, evaluated_thresholds, trained_folder
from d2dprompt.core.data.images import ImageError, rgb_of
from d2dprompt.core.eval.thresholds import Thresholds
from tests.conftest import ROOT

SAMPLE_IMAGE = ROOT / "sample/weave/test/hole/000.png"


def prediction(map_values: np.ndarray, image_hw=(40, 60)) -> Prediction:
    image = np.zeros((*image_hw, 3), np.uint8)
    t = Thresholds(0.5, 0.5, "fitted")
    small = map_values >= 0.5
    return Prediction(0.6, 1, np.zeros(image_hw, np.float32), np.zeros(image_hw, bool), t, image, map_values.astype(np.float32), small, (0.0, 1.0), (0, 0))


def test_rgb_of_reads_every_kind_of_input_and_names_the_bad_one():
    from_path = rgb_of(SAMPLE_IMAGE)
    assert from_path.dtype == np.uint8 and from_path.shape == (128, 128, 3)
    assert np.array_equal(rgb_of(SAMPLE_IMAGE.read_bytes()), from_path)
    assert np.array_equal(rgb_of(Image.open(SAMPLE_IMAGE)), from_path)
    assert rgb_of(Image.open(SAMPLE_IMAGE).convert("L")).shape == (128, 128, 3)  # grey is converted, as load_rgb does
    assert np.array_equal(rgb_of(from_path), from_path)
    with pytest.raises(ImageError, match=r"^images\[1\]: an array must be HxWx3 uint8, got float32"):
        rgb_of(from_path.astype(np.float32), "images[1]")
    with pytest.raises(ImageError, match=r"^upload: cannot decode image"):
        rgb_of(b"not an image", "upload")
    with pytest.raises(ImageError, match="expected a path, image bytes, a PIL image or an HxWx3 uint8 array, got int"):
        rgb_of(3)


def test_new_thresholds_redecide_label_and_mask_without_touching_the_map():
    values = np.zeros((8, 8))
    values[2:5, 2:5] = 0.7
    values[0, 0] = 0.4
    base = prediction(values)
    assert base.with_thresholds() is base and base.with_thresholds(0.5, 0.5) is base  # nothing changed: the same result
    looser = base.with_thresholds(pixel=0.3)
    assert looser.thresholds == Thresholds(0.5, 0.3, "chosen by hand") and looser.label == 1
    assert looser.map_mask.sum() == 10 and base.map_mask.sum() == 9  # the 0.4 pixel joins
    assert looser.mask.shape == (40, 60) and looser.mask.any()
    assert np.shares_memory(looser.map, base.map)  # the map is the same array: no inference ran
    assert base.with_thresholds(image=0.9).label == 0
    summary = looser.summary()
    assert summary["pixel_threshold"] == 0.3 and summary["anomalous_pixels"] == int(looser.mask.sum())


def test_the_normalised_score_is_a_half_at_the_threshold_and_on_the_labels_side_of_it():
    """anomalib users read a [0, 1] score with the line at 0.5 whatever the method's scale: (score - threshold) /
    (validation max - min) + 0.5, clipped; a rounding can never put a normal image at 0.5."""
    from dataclasses import replace

    base = replace(prediction(np.zeros((8, 8))), score_range=(2.0, 6.0))  # threshold 0.5, a spread of 4
    assert prediction(np.zeros((8, 8))).normalized_score is None  # no range recorded: no normalised score
    for score, expected in ((0.5, 0.5), (1.5, 0.75), (-0.5, 0.25), (9.0, 1.0), (-9.0, 0.0)):
        result = replace(base, score=score, label=int(score >= 0.5))
        assert result.normalized_score == expected and result.summary()["normalized_score"] == expected
    below = replace(base, score=float(np.nextafter(0.5, 0.0)), label=0)
    assert below.normalized_score < 0.5 and below.with_thresholds(image=0.25).normalized_score > 0.5


def test_a_folder_of_runs_needs_a_method_when_it_holds_several(tmp_path):
    for name in ("d2dprompt", "draem"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text("{}")
    assert trained_folder(tmp_path / "draem", None) == tmp_path / "draem"
    assert trained_folder(tmp_path, "draem") == tmp_path / "draem"
    with pytest.raises(FileNotFoundError, match=r"several runs \(d2dprompt, draem\): pass method="):
        trained_folder(tmp_path, None)
    with pytest.raises(FileNotFoundError, match="no trained run 'anomalyclip' here"):
        trained_folder(tmp_path, "anomalyclip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no model.json: not a trained run; run the train stage first"):
        trained_folder(tmp_path / "empty", None)


def test_among_several_runs_the_method_params_yaml_lists_first_is_the_one_loaded(tmp_path, monkeypatch):
    """After `dvc exp run -S 'methods=[draem,d2dprompt]'` both runs stay in stages/train: the API and the app take
    the one params.yaml lists first (they refused, or opened on the first alphabetically); method= still wins."""
    from d2dprompt.params import params_from_dict
    from d2dprompt.serve.detector import listed_methods

    for name in ("d2dprompt", "draem", "patchknn"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text("{}")
    assert trained_folder(tmp_path, None, ["draem", "d2dprompt"]) == tmp_path / "draem"
    assert trained_folder(tmp_path, None, ["anomalyclip", "patchknn"]) == tmp_path / "patchknn"  # the first that has a run
    assert trained_folder(tmp_path, "d2dprompt", ["draem"]) == tmp_path / "d2dprompt"
    with pytest.raises(FileNotFoundError, match="several runs"):
        trained_folder(tmp_path, None, ["anomalyclip"])
    assert listed_methods(params_from_dict({"methods": ["patchknn", "d2dprompt"]})) == ["patchknn", "d2dprompt"]
    monkeypatch.chdir(tmp_path)
    assert listed_methods(None) == []
    (tmp_path / "params.yaml").write_text("methods: [draem]\n")
    assert listed_methods(None) == ["draem"]


def test_thresholds_are_found_where_evaluate_writes_them(tmp_path):
    run = tmp_path / "stages/train/d2dprompt"
    run.mkdir(parents=True)
    assert evaluated_thresholds(run, None) is None
    for dataset in ("sample", "mvtec"):
        (tmp_path / "stages/evaluate/d2dprompt" / dataset).mkdir(parents=True)
        (tmp_path / "stages/evaluate/d2dprompt" / dataset / "thresholds.json").write_text("{}")
    with pytest.raises(ThresholdsError, match=r"several datasets \(mvtec, sample\): pass dataset="):
        evaluated_thresholds(run, None)
    assert evaluated_thresholds(run, "sample") == tmp_path / "stages/evaluate/d2dprompt/sample/thresholds.json"
    with pytest.raises(ThresholdsError, match="visa/thresholds.json: not found; run evaluate@d2dprompt-visa"):
        evaluated_thresholds(run, "visa")
    (run / "thresholds.json").write_text("{}")  # bundled beside the run (an MLflow model): that one
    assert evaluated_thresholds(run, None) == run / "thresholds.json"


@pytest.mark.e2e
def test_the_readme_python_api_example_runs_as_written(workspace, trained, tmp_path, monkeypatch):
    import re

    (block,) = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S) if "Detector.load" in b]
    shutil.copytree(trained, tmp_path / "stages/train/d2dprompt")  # a checkout after `make repro`
    (tmp_path / "stages/evaluate/d2dprompt/sample").mkdir(parents=True)
    shutil.copy(workspace / "stages/evaluate-trained/sample/thresholds.json", tmp_path / "stages/evaluate/d2dprompt/sample")
    (tmp_path / "sample").symlink_to(ROOT / "sample")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert "F1-max on the validation split" in namespace["res"].thresholds.source
    assert Image.open(tmp_path / "overlay.png").size == (128, 128) and len(namespace["results"]) == 2


@pytest.mark.e2e
def test_the_api_gives_evaluates_score_for_any_form_of_a_sample_test_image(workspace, trained):
    from d2dprompt import Detector

    thresholds = workspace / "stages/evaluate-trained/sample/thresholds.json"
    with (workspace / "stages/evaluate-trained/sample/scores.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "1"][:2]
    det = Detector.load(trained, thresholds=thresholds)
    fitted = json.loads(thresholds.read_text())
    assert (det.thresholds.image, det.thresholds.pixel) == (fitted["image"], fitted["pixel"])
    path = workspace / "stages/download/sample" / rows[0]["image_path"]
    pixels = np.asarray(Image.open(path).convert("RGB"))
    forms = [det.predict(path), det.predict(str(path)), det.predict(Image.open(path)), det.predict(pixels), det.predict(path.read_bytes())]
    for result in forms:
        assert abs(result.score - float(rows[0]["score"])) < 1e-5, (result.score, rows[0]["score"])
        assert result.label == int(result.score >= fitted["image"])
        low, high = fitted["score_range"]  # the validation scores' range, recorded by evaluate
        assert result.normalized_score == pytest.approx(np.clip((result.score - fitted["image"]) / (high - low) + 0.5, 0, 1))
        assert (result.normalized_score >= 0.5) == bool(result.label)
        assert result.anomaly_map.shape == result.mask.shape == pixels.shape[:2]
        assert result.overlay.size == (pixels.shape[1], pixels.shape[0])
    batch = det.predict_batch([workspace / "stages/download/sample" / r["image_path"] for r in rows], batch_size=1)
    assert [abs(b.score - float(r["score"])) < 1e-5 for b, r in zip(batch, rows)] == [True, True]
    with pytest.raises(ImageError, match=r"^images\[0\]: image is 64x64, smaller than the model's input side 128"):
        det.predict(np.zeros((64, 64, 3), np.uint8))


def test_a_run_being_retrained_is_named_as_in_progress_not_as_missing(tmp_path):
    """DVC deletes a stage's outputs before rerunning it: while `dvc exp run` retrains in the workspace, the app, the
    API and predict say that a run is in progress (from DVC's stage lock), not "run make repro"."""
    import json
    import os
    import subprocess
    import sys

    from d2dprompt.serve.app import find_runs

    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    (tmp_path / "stages/train").mkdir(parents=True)
    out = tmp_path / "stages/train/d2dprompt"

    def lock(pid: int) -> None:
        (tmp_path / ".dvc/tmp/rwlock").write_text(json.dumps({"write": {str(out): {"pid": pid, "cmd": "dvc exp run -S loss.sharpness=0.3"}}, "read": {}}))

    lock(os.getpid())
    busy = r"a training run is in progress and writes here now \(pid \d+: dvc exp run -S loss.sharpness=0.3\)"
    with pytest.raises(FileNotFoundError, match=busy):
        Detector.load(tmp_path / "stages/train")
    with pytest.raises(FileNotFoundError, match=busy):
        Detector.load(out)
    with pytest.raises(FileNotFoundError, match=busy):
        find_runs(tmp_path / "stages/train")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock(gone.pid)  # a killed run's stale entry: the folder is simply missing
    with pytest.raises(FileNotFoundError, match="no such trained run folder"):
        Detector.load(out)
    with pytest.raises(FileNotFoundError, match=r"no trained run here .* run `make repro`"):
        find_runs(tmp_path / "stages/train")
