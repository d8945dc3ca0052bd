"""End to end through DVC, as the README shows it: every method on the bundled sample with the tiny models."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors.torch import load_file

from tests.conftest import METHODS, run_cmd
from tests.test_readme import check_narrow_view

HEADLINE = ["image_AUROC", "pixel_AUROC", "pixel_AUPRO"]
pytestmark = pytest.mark.e2e


def test_dvc_metrics_show_lists_every_method_side_by_side(every_method):
    shown = json.loads(run_cmd(["dvc", "metrics", "show", "--json"], every_method).stdout)
    (workspace,) = [v for v in shown.values()]
    files = workspace["data"]
    for method in METHODS:
        shown_file = files[f"metrics/{method}/sample.json"]["data"]
        written = json.loads((every_method / f"metrics/{method}/sample.json").read_text())
        headline = [m + bound for m in HEADLINE for bound in ("", "_lo", "_hi")]  # each headline metric, then its interval
        assert shown_file["mean"] == written["mean"] and list(shown_file["mean"])[: len(headline)] == headline  # as evaluate wrote it
        for m in HEADLINE:  # each mean is the mean over the categories, and a category's value is computed, not a default
            values = [c[m] for c in written["per_category"].values()]
            assert abs(written["mean"][m] - sum(values) / len(values)) < 1e-12 and len(set(values)) > 1, (method, m, values)
    table = run_cmd(["dvc", "metrics", "show"], every_method).stdout
    assert all(f"metrics/{m}/sample.json" in table for m in METHODS)
    header = table.splitlines()[0].split()
    assert header[0] == "Path" and header[1].startswith("mean."), header[:3]  # the means, not a category, come first
    check_narrow_view(every_method, "metrics/d2dprompt/sample.json:mean.pixel_AUPRO", methods=len(METHODS))  # README's commands
    compared = json.loads((every_method / "metrics/compare/sample.json").read_text())  # compare@sample ran after them all
    assert compared["methods"] == list(METHODS) and len(compared["pairs"]) == len(METHODS) * (len(METHODS) - 1) // 2


def test_each_method_is_trained_only_where_it_learns(every_method):
    stages = every_method / "stages/train"
    records = {m: json.loads((stages / m / "model.json").read_text()) for m in METHODS}
    assert {m: r["method"] for m, r in records.items()} == {m: m for m in METHODS}
    assert load_file(stages / "d2d/model.safetensors") == {}  # d2d learns nothing
    for method in ("d2d", "patchknn"):  # nothing is optimised: no epochs
        assert (stages / method / "history.csv").read_text().strip() == "epoch"
    for method in ("d2dprompt", "anomalyclip", "draem", "decodiff"):
        assert load_file(stages / method / "model.safetensors")
        assert len((stages / method / "history.csv").read_text().splitlines()) == 1 + 2
    assert "anomalyclip" in records["anomalyclip"] and "attention" not in records["anomalyclip"]
    categories = ["sample/disc", "sample/tile", "sample/weave"]
    assert records["draem"]["categories"] == records["decodiff"]["categories"] == records["patchknn"]["categories"] == categories  # per category
    assert "memory" not in records["d2dprompt"] and records["d2dprompt"]["fewshot"]["k"] == 0  # fewshot.k 0: the prompts alone
    assert records["patchknn"]["references"]["sample/disc"] == sorted(records["patchknn"]["references"]["sample/disc"])
    assert len(records["patchknn"]["references"]["sample/disc"]) > 4  # k 0: every normal training image of the category
    draem = load_file(stages / "draem/model.safetensors")
    assert {"/".join(k.split("/")[:2]) for k in draem} == set(categories)  # one DRAEM per category in one file


def test_every_method_fits_thresholds_on_the_same_validation_rows(every_method):
    thresholds = {m: json.loads((every_method / f"stages/evaluate/{m}/sample/thresholds.json").read_text()) for m in METHODS}
    sources = {t["source"] for t in thresholds.values()}
    assert len(sources) == 1 and "validation split" in sources.pop()
    fitted_on = {}
    for method in METHODS:  # the very same held-out images and synthetic anomalies, row by row
        with (every_method / f"stages/evaluate/{method}/sample/validation.csv").open() as fh:
            fitted_on[method] = [(r["key"], r["label"]) for r in csv.DictReader(fh)]
    assert all(rows == fitted_on["d2dprompt"] for rows in fitted_on.values()) and {label for _, label in fitted_on["d2dprompt"]} == {"0", "1"}
    index = (every_method / "stages/latents/sample/index.csv").read_text().splitlines()
    assert len(fitted_on["d2dprompt"]) == sum(",val," in line for line in index)
    assert thresholds["anomalyclip"]["score"] == "anomalyclip" and thresholds["d2d"]["score"] == "fused"
    assert thresholds["draem"]["score"] == "draem" and thresholds["decodiff"]["score"] == "decodiff" and thresholds["patchknn"]["score"] == "patchknn"
    scores = {m: (every_method / f"stages/evaluate/{m}/sample/scores.csv").read_text().splitlines() for m in METHODS}
    keys = {m: [line.split(",")[:4] for line in rows] for m, rows in scores.items()}
    assert all(keys[m] == keys["d2dprompt"] for m in METHODS)  # the same test images, in the same order


@pytest.mark.parametrize("method", ["d2d", "anomalyclip", "draem", "decodiff", "patchknn"])
def test_predict_scores_a_test_image_as_evaluate_did_for_every_method(every_method, method, tmp_path):
    import csv
    import shutil

    with (every_method / f"stages/evaluate/{method}/sample/scores.csv").open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["label"] == "1")
    renamed = tmp_path / "renamed.png"
    shutil.copy(every_method / "stages/download/sample" / row["image_path"], renamed)
    category = ["--category", f"sample/{row['category']}"] if method in ("draem", "decodiff", "patchknn") else []  # models / class labels / memories per category
    run_cmd(["python", "-m", "d2dprompt.pipeline.predict", str(renamed), "--trained", f"stages/train/{method}", "--out", str(tmp_path / "out"),
             "--thresholds", f"stages/evaluate/{method}/sample/thresholds.json", *category], every_method)
    (record,) = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert abs(record["score"] - float(row["score"])) < 1e-5, (row, record)


def test_a_trained_folder_and_its_thresholds_are_enough_to_predict_outside_the_repository(every_method, tmp_path):
    import csv

    with (every_method / "stages/evaluate/d2dprompt/sample/scores.csv").open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["label"] == "1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no params.yaml, no stages/: a trained run copied to an inspection PC
    run_cmd(["python", "-m", "d2dprompt.pipeline.predict", str(every_method / "stages/download/sample" / row["image_path"]),
             "--trained", str(every_method / "stages/train/d2dprompt"), "--out", "out",
             "--thresholds", str(every_method / "stages/evaluate/d2dprompt/sample/thresholds.json")], elsewhere)
    (record,) = [json.loads(line) for line in (elsewhere / "out/predictions.jsonl").read_text().splitlines()]
    assert abs(record["score"] - float(row["score"])) < 1e-5, (row, record)


def test_dvc_plots_show_writes_a_page_that_needs_no_network(every_method, tmp_path):
    import re

    run_cmd(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], every_method)
    page = (tmp_path / "plots/index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page) and "cdn.jsdelivr" not in page  # vega is inlined
    assert page.count("<script data-package=") == 3
    for method in METHODS:
        assert f"{method} sample image ROC" in page
        assert (f"{method} training loss terms per epoch" in page) == (method not in ("d2d", "patchknn"))  # nothing optimised: no curve
    assert "AUROC" in page and '"term"' in page  # the legend carries each curve's area; every loss term is a series


def test_few_shot_runs_end_to_end_and_dvc_metrics_show_lists_both(few_shot):
    shown = json.loads(run_cmd(["dvc", "metrics", "show", "--json"], few_shot).stdout)
    (workspace,) = shown.values()
    assert {"metrics/d2dprompt/sample.json", "metrics/patchknn/sample.json"} <= set(workspace["data"])
    records = {m: json.loads((few_shot / f"stages/train/{m}/model.json").read_text()) for m in ("d2dprompt", "patchknn")}
    memory = records["d2dprompt"]["memory"]
    assert records["d2dprompt"]["categories"] == list(memory) == ["sample/disc", "sample/tile", "sample/weave"]
    for category, entry in memory.items():  # the same 4 reference images for both methods: one draw per (seed, category)
        assert len(entry["references"]) == 4 and entry["references"] == records["patchknn"]["references"][category]
        assert entry["memory_stats"][1] > 0 and entry["prompt_stats"][1] > 0  # normalised on the validation split
    weights = load_file(few_shot / "stages/train/d2dprompt/model.safetensors")
    assert any(k.startswith("memory/") for k in weights) and any(not k.startswith("memory/") for k in weights)


@pytest.mark.parametrize("method", ["d2dprompt", "patchknn"])
def test_predict_and_the_detector_score_with_the_memory_as_evaluate_did(few_shot, method, tmp_path):
    import csv
    import shutil

    from d2dprompt.serve.detector import Detector

    with (few_shot / f"stages/evaluate/{method}/sample/scores.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh)]
    row = next(r for r in rows if r["label"] == "1")
    renamed = tmp_path / "renamed.png"
    shutil.copy(few_shot / "stages/download/sample" / row["image_path"], renamed)
    run_cmd(["python", "-m", "d2dprompt.pipeline.predict", str(renamed), "--trained", f"stages/train/{method}", "--out", str(tmp_path / "out"),
             "--thresholds", f"stages/evaluate/{method}/sample/thresholds.json", "--category", f"sample/{row['category']}"], few_shot)
    (record,) = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert abs(record["score"] - float(row["score"])) < 1e-5, (row, record)
    detector = Detector.load(few_shot / f"stages/train/{method}", thresholds=few_shot / f"stages/evaluate/{method}/sample/thresholds.json",
                             category=f"sample/{row['category']}")
    result = detector.predict(renamed)
    assert abs(result.score - float(row["score"])) < 1e-5 and result.label == int(row["predicted"])
    with pytest.raises(ValueError, match="choose --category from sample/disc"):
        Detector.load(few_shot / f"stages/train/{method}", thresholds=None)
