"""patchknn's memories (train@patchknn): k reference images per category as D2D-Prompt draws them, a reference image
scores 0, a memory over budget is a coreset of the full one, and a killed run keeps its finished categories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2dprompt.core.data.latent_store import read_latents
from d2dprompt.methods import registry
from d2dprompt.methods.base import Scoring, TrainJob
from d2dprompt.methods.patch_memory import nearest_distances
from d2dprompt.methods.patchknn import train as train_patchknn
from d2dprompt.params import params_from_dict
from d2dprompt.trained import load_trained
from tests.conftest import ROOT, sample_latents
from tests.test_train import Kill

CATEGORIES = ["tile", "weave"]
SCORING = Scoring(map_size=32, sigma=2.0, score="max", top_percent=5.0, image_top_percent=1.0, precision="fp32", batch_size=4)


def config(fewshot=None, **knn):
    return params_from_dict({
        "methods": ["patchknn"], "download": {"categories": CATEGORIES}, "model": {"image_size": 64},
        "latents": {"synthetic_per_image": 1}, "fewshot": {"k": 2, **(fewshot or {})}, "patchknn": knn,
    })


@pytest.fixture(scope="module")
def latents_root(tmp_path_factory, tiny) -> Path:
    return sample_latents(tmp_path_factory.mktemp("latents"), tiny, CATEGORIES, config().latents)


def train(latents_root: Path, tmp: Path, cfg=None, echo=print) -> Path:
    job = TrainJob(latents_root, ROOT, tmp / "queries", tmp / "out", tmp / "ckpt", None, "v1", echo)
    registry.get("patchknn").train(cfg or config(), job)
    return tmp / "out"


def scores_of(out: Path, latents_root: Path, category: str, rows: list[int], inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model, record, method = load_trained(out)
    return method.scorer(model, record, SCORING, torch.device("cpu"))(inputs[rows], [f"sample/{category}"] * len(rows))


@pytest.mark.parametrize("features", ["latents", "pixels"])
def test_a_reference_image_scores_exactly_zero_and_another_normal_image_does_not(latents_root, tmp_path, features):
    out = train(latents_root, tmp_path, config(features=features))
    record = json.loads((out / "model.json").read_text())
    assert record["categories"] == ["sample/tile", "sample/weave"] and all(len(r) == 2 for r in record["references"].values())
    tensors, rows = read_latents(latents_root / "sample")
    channels, height, width = tensors["latents"].shape[1:]
    expected = [2 * height * width, channels * 3 * 3] if features == "latents" else [2 * (64 // 8) ** 2, 3 * 8 * 8]  # 3 x 3 cells, 8 x 8 patches
    assert all(shape == expected for shape in record["memory_shapes"].values())
    if features == "pixels":
        from d2dprompt.core.data.row_images import RowImages

        inputs = RowImages([ROOT / "sample"] * len(rows), rows, config().latents, 64, 64).batch(list(range(len(rows))))[0]
    else:
        inputs = tensors["latents"]
    references = [i for i, r in enumerate(rows) if r.source == "real" and r.image_path in record["references"]["sample/tile"]]
    others = [i for i, r in enumerate(rows) if r.category == "tile" and r.split == "train" and r.source == "real" and i not in references]
    maps, scores = scores_of(out, latents_root, "tile", references, inputs)
    assert torch.equal(maps, torch.zeros_like(maps)) and torch.equal(scores, torch.zeros(2))
    _, other_scores = scores_of(out, latents_root, "tile", others, inputs)
    assert (other_scores > 0).all()


def test_the_draw_follows_fewshot_seed_and_k_0_keeps_every_normal_training_image(latents_root, tmp_path):
    drawn = {s: json.loads((train(latents_root, tmp_path / str(s), config({"seed": s})) / "model.json").read_text())["references"] for s in (0, 1)}
    assert drawn[0] != drawn[1]
    everything = json.loads((train(latents_root, tmp_path / "all", config({"k": 0})) / "model.json").read_text())
    _, rows = read_latents(latents_root / "sample")
    assert everything["references"]["sample/tile"] == [r.image_path for r in rows if r.category == "tile" and r.split == "train" and r.source == "real"]


def test_a_memory_over_its_budget_keeps_a_coreset_of_the_full_memory(latents_root, tmp_path):
    full = load_file(train(latents_root, tmp_path / "full", config({"k": 0})) / "model.safetensors")
    width = next(iter(full.values())).shape[1]
    budget_mb = 40 * width * 4 / 2**20  # 40 rows of fp32 features
    small = load_file(train(latents_root, tmp_path / "small", config({"k": 0, "memory_mb": budget_mb})) / "model.safetensors")
    for name, rows in small.items():
        assert rows.shape == (40, width) and rows.shape[0] < full[name].shape[0]
        assert torch.equal(nearest_distances(rows, full[name]), torch.zeros(40))  # every kept row is a row of the full memory


def test_a_killed_run_keeps_the_finished_categories_and_ends_as_an_uninterrupted_one(latents_root, tmp_path, monkeypatch):
    uninterrupted = load_file(train(latents_root, tmp_path / "once") / "model.safetensors")
    real, calls = train_patchknn.category_memory, []

    def dies_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise Kill
        return real(*args)

    monkeypatch.setattr(train_patchknn, "category_memory", dies_on_the_second)
    with pytest.raises(Kill):
        train(latents_root, tmp_path / "killed")
    monkeypatch.setattr(train_patchknn, "category_memory", real)
    said: list[str] = []
    resumed = load_file(train(latents_root, tmp_path / "killed", echo=said.append) / "model.safetensors")
    assert any("sample/tile: memory resumed" in line for line in said) and not any("weave: memory resumed" in line for line in said)
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert not (tmp_path / "killed/ckpt").exists()


@pytest.mark.parametrize("block, message", [
    ({"patchknn": {"neighbourhood": 2}}, "patchknn.neighbourhood: 2 has no centre cell"),
    ({"patchknn": {"features": "pixels", "patch": 7}}, "patchknn.patch: 7 does not divide model.image_size=64"),
    ({"evaluate": {"threshold": "fixed"}}, "patchknn's maps are feature distances"),
])
def test_settings_that_cannot_work_are_refused(block, message):
    from d2dprompt.core.runtime.config import ParamsError

    raw = {"methods": ["patchknn"], "model": {"image_size": 64}, **block}
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


def test_mutual_scoring_keeps_no_memory_and_scores_a_category_against_itself(latents_root, tmp_path):
    from d2dprompt.core.eval.maps import to_image_size
    from d2dprompt.methods.patch_memory import mutual_map
    from d2dprompt.methods.patchknn.model import LAYER, patch_features
    from d2dprompt.serve.detector import Detector

    out = train(latents_root, tmp_path, config({"k": 0, "mutual": True}))
    record = json.loads((out / "model.json").read_text())
    assert record["memory_shapes"] == {} and load_file(out / "model.safetensors") == {}
    tensors, rows = read_latents(latents_root / "sample")
    test = [i for i, r in enumerate(rows) if r.category == "weave" and r.split == "test"]
    maps, scores = scores_of(out, latents_root, "weave", test, tensors["latents"])
    features, grid = patch_features(tensors["latents"][test], "latents", 3, 8)
    expected = to_image_size(mutual_map({LAYER: features}, {LAYER: 0}, grid, 0.3), SCORING.map_size, SCORING.sigma)
    torch.testing.assert_close(maps, expected)
    assert torch.equal(scores, maps.flatten(1).amax(1))
    labels = torch.tensor([rows[i].label for i in test])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()  # the defects are what the other images lack
    with pytest.raises(ValueError, match="scores a category's test images against each other"):
        Detector.load(out, thresholds=None, category="sample/weave")
    with pytest.raises(Exception, match="mutual: scores test images against each other, with no reference image; set fewshot.k: 0"):
        config({"k": 2, "mutual": True})


def test_the_mlflow_model_of_a_run_with_several_categories_loads_and_asks_which_one_scores(latents_root, tmp_path):
    from types import SimpleNamespace

    import pandas as pd

    from d2dprompt.serve.detector import Detector, ThresholdsError
    from d2dprompt.serve.mlflow_model import DetectorModel

    out = train(latents_root, tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"methods": ["patchknn"], "model": {"image_size": 64}, "fewshot": {"k": 2}}))  # JSON is YAML
    context = SimpleNamespace(artifacts={"trained": str(out), "params": str(params)})
    model = DetectorModel()
    model.load_context(context)  # before: "patchknn knows its categories: choose --category from ..." at load
    image = ROOT / "sample/tile/test/good/000.png"
    frame = pd.DataFrame({"image": [image.read_bytes()]})
    with pytest.raises(ValueError, match=r"pass params=\{'category': \.\.\.\}, one of sample/tile \| sample/weave"):
        model.predict(context, frame)
    # feature distances: evaluate.sensitivity (0.5, on the [0, 1] scale) cannot decide them; a request passes thresholds
    with pytest.raises(ValueError, match=r"^patchknn's maps are feature distances, not in \[0, 1\].*pass params=\{'image_threshold'"):
        model.predict(context, frame, {"category": "sample/weave"})
    with pytest.raises(ThresholdsError, match=r"/out: patchknn's maps are feature distances, not in \[0, 1\], so evaluate.sensitivity=0.5 cannot"):
        Detector.load(out, params=params, thresholds=None, category="sample/weave")
    for category in ("sample/weave", "sample/tile"):
        scored = model.predict(context, frame, {"category": category, "image_threshold": 3.0, "pixel_threshold": 2.0})
        expected = Detector.load(out, params=params, thresholds=None, category=category, image_threshold=3.0, pixel_threshold=2.0).predict(image)
        assert scored.loc[0, "score"] == pytest.approx(expected.score, abs=1e-6) and scored.loc[0, "label"] == expected.label
