"""DRAEM's training: one model per category, the authors' rotation, draws that do not depend on the worker count,
and a killed run that resumes bit for bit (finished categories kept, the one in training from its last epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from d2dprompt.methods import registry
from d2dprompt.methods.base import TrainJob
from d2dprompt.methods.draem import train as train_draem
from d2dprompt.params import params_from_dict
from tests.conftest import ROOT, sample_latents
from tests.test_train import Kill

CATEGORIES = ["tile", "weave"]


def config(**draem):
    return params_from_dict({
        "methods": ["draem"],
        "download": {"categories": CATEGORIES},
        "model": {"image_size": 64},
        "latents": {"synthetic_per_image": 1},
        "draem": {"image_size": 64, "recon_width": 2, "disc_width": 2, "epochs": 3, "batch_size": 4, "workers": 0, "checkpoint_every": 1, **draem},
    })


@pytest.fixture(scope="module")
def latents_root(tmp_path_factory, tiny) -> Path:
    return sample_latents(tmp_path_factory.mktemp("latents"), tiny, CATEGORIES, config().latents)


class KillIn:
    """Stands for the process dying right after `category`'s epoch `epoch` was checkpointed."""

    def __init__(self, category: str, epoch: int):
        self.category, self.epoch = category, epoch

    def log_metrics(self, metrics, step=None):
        if step == self.epoch and any(k.startswith(f"loss_{self.category}/") for k in metrics):
            raise Kill


def run(latents_root: Path, tmp: Path, log=None, **draem):
    return registry.get("draem").train(config(**draem), TrainJob(latents_root, ROOT, tmp / "queries", tmp / "out", tmp / "ckpt", log, "v1"))


@pytest.fixture(scope="module")
def uninterrupted(latents_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("draem")
    history = run(latents_root, tmp)
    return history, load_file(tmp / "out/model.safetensors"), json.loads((tmp / "out/model.json").read_text())


def test_one_model_per_category_learns(uninterrupted):
    history, weights, record = uninterrupted
    assert record["categories"] == ["sample/tile", "sample/weave"] and record["draem"]["rotation_share"] == 0.3
    assert {"/".join(k.split("/")[:2]) for k in weights} == set(record["categories"])
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch"} | {f"{c}/{t}" for c in record["categories"] for t in ("l2", "ssim", "focal", "total")}


@pytest.mark.parametrize("category, epoch, every, saved", [("sample/tile", 1, 1, 1), ("sample/weave", 2, 1, 2), ("sample/weave", 1, 2, 3)])  # between saves: weave starts over
def test_a_killed_run_resumes_bit_for_bit(latents_root, tmp_path, uninterrupted, category, epoch, every, saved, capsys):
    with pytest.raises(Kill):
        run(latents_root, tmp_path, log=KillIn(category, epoch), checkpoint_every=every)
    assert (tmp_path / "ckpt").is_dir() and not (tmp_path / "out").exists()
    resumed = run(latents_root, tmp_path, checkpoint_every=every)
    assert f"resuming after epoch {saved}" in capsys.readouterr().out
    history, weights, _ = uninterrupted
    assert resumed == history
    again = load_file(tmp_path / "out/model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # BatchNorm's running statistics included
    assert not (tmp_path / "ckpt").exists()


def test_draws_do_not_depend_on_the_worker_count(latents_root, tmp_path, uninterrupted):
    run(latents_root, tmp_path, workers=2)
    weights = uninterrupted[1]
    again = load_file(tmp_path / "out/model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_the_authors_rotation_turns_about_30_percent_of_images():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :16] = 200  # left half bright: any rotation but 0 moves it
    turned = [not np.array_equal(train_draem.rotated(image, np.random.default_rng(seed), 0.3), image) for seed in range(2000)]
    assert 0.27 < np.mean(turned) < 0.33  # 2,000 seeded draws: 0.303
    assert all(np.array_equal(train_draem.rotated(image, np.random.default_rng(s), 0.0), image) for s in range(20))  # off
    corners = train_draem.rotated(image, np.random.default_rng(next(s for s in range(2000) if turned[s])), 1.0)
    assert corners.shape == image.shape and corners.dtype == np.uint8


def test_rotation_is_drawn_per_image_and_epoch_and_the_target_is_the_rotated_image():
    from d2dprompt.core.runtime.config import LatentsParams

    picture = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    draws = train_draem.DraemDraws([picture], ["draem/a.png"], LatentsParams(), anomaly_share=0.0, rotation_share=1.0)
    (augmented, clean, mask), again = draws[(0, 5)], draws[(0, 5)]
    assert np.array_equal(augmented, clean) and not mask.any()  # no anomaly: the input is the (rotated) target itself
    assert np.array_equal(clean, again[1])  # a pure function of (seed, image, epoch)
    assert not np.array_equal(clean, draws[(0, 6)][1])  # another epoch, another angle
    assert not np.array_equal(clean, picture)
