"""AnomalyCLIP's training: the same rows as D2D-Prompt for both protocols, prompts that learn, resume bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2dprompt.core.data.row_images import RowImages
from d2dprompt.methods import registry
from d2dprompt.methods.anomalyclip import train as train_anomalyclip
from d2dprompt.methods.base import TrainJob
from d2dprompt.params import params_from_dict
from d2dprompt.core.data.latent_store import training_set
from tests.conftest import ROOT, sample_latents
from tests.test_train import Kill, KillAfter

EPOCHS = 2


def config(supervision: str = "synthetic"):
    return params_from_dict(
        {
            "methods": ["anomalyclip"],
            "download": {"categories": ["tile"]},
            "model": {"image_size": 64},
            "latents": {"synthetic_per_image": 1},
            "train": {"epochs": EPOCHS, "batch_size": 8, "supervision": supervision},
            "evaluate": {"datasets": []},
            "anomalyclip": {"image_size": 56, "dpam_layers": 4},
        }
    )


@pytest.fixture(scope="module")
def latents_root(tmp_path_factory, tiny) -> Path:
    return sample_latents(tmp_path_factory.mktemp("latents"), tiny, ["tile"], config().latents)


@pytest.mark.parametrize("supervision", ["synthetic", "annotated"])
def test_anomalyclip_trains_on_the_rows_d2dprompt_trains_on(latents_root, supervision):
    roots, rows = train_anomalyclip.training_rows(latents_root, ROOT, ["sample"], supervision)
    *_, labels, keys = training_set(latents_root, ["sample"], supervision)
    assert [f"sample/{r.key}" for r in rows] == keys and [r.label for r in rows] == labels.int().tolist()
    assert set(roots) == {ROOT / "sample"}
    images, masks, batch_labels = RowImages(roots, rows, config(supervision).latents, 64, 56).batch([0, len(rows) - 1])
    assert images.shape == (2, 3, 56, 56) and masks.shape == (2, 56, 56)
    assert batch_labels.tolist() == [rows[0].label, rows[-1].label]


def run(latents_root: Path, tmp: Path, kill_after: int | None = None):
    log = KillAfter(kill_after) if kill_after is not None else None
    return registry.get("anomalyclip").train(config(), TrainJob(latents_root, ROOT, tmp / "queries", tmp / "out", tmp / "ckpt", log, "v1"))


def test_prompts_learn_and_a_killed_run_resumes_bit_for_bit(latents_root, tmp_path):
    history = run(latents_root, tmp_path / "a")
    assert [row["epoch"] for row in history] == [1, 2] and history[1]["total"] < history[0]["total"]
    learned = load_file(tmp_path / "a/out/model.safetensors")
    torch.manual_seed(config().train.seed)
    initial = registry.get("anomalyclip").build(config(), {}).prompts.state_dict()
    assert any(not torch.equal(learned[k], initial[k]) for k in initial)  # the optimiser moved them
    assert not (tmp_path / "a/ckpt").exists()  # finished: no checkpoint left to resume into stale outputs

    with pytest.raises(Kill):
        run(latents_root, tmp_path / "b", kill_after=1)
    assert (tmp_path / "b/ckpt").is_dir() and not (tmp_path / "b/out").exists()  # a killed first run leaves no empty output folder
    resumed = run(latents_root, tmp_path / "b")
    assert [row["epoch"] for row in resumed] == [1, 2]
    again = load_file(tmp_path / "b/out/model.safetensors")
    assert all(torch.equal(learned[k], again[k]) for k in learned)
