"""DeCo-Diff's training: normal training latents only, one class per category, a UNet that learns, resume bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2dprompt.methods import registry
from d2dprompt.methods.base import TrainJob
from d2dprompt.methods.decodiff import train as train_decodiff
from d2dprompt.core.runtime.config import ParamsError
from d2dprompt.params import params_from_dict
from d2dprompt.core.data.latent_store import read_index
from d2dprompt.trained import load_trained
from tests.conftest import ROOT, sample_latents
from tests.test_train import Kill, KillAfter

CATEGORIES = ["tile", "weave"]


def config(**decodiff):
    return params_from_dict(
        {
            "methods": ["decodiff"],
            "download": {"categories": CATEGORIES},
            "model": {"image_size": 64},
            "latents": {"synthetic_per_image": 1},
            "decodiff": {"channels": [16, 32], "epochs": 3, "batch_size": 8, "warmup_epochs": 1, **decodiff},
        }
    )


@pytest.fixture(scope="module")
def latents_root(tmp_path_factory, tiny) -> Path:
    return sample_latents(tmp_path_factory.mktemp("latents"), tiny, CATEGORIES, config().latents)


def test_it_trains_on_the_normal_training_latents_with_a_class_per_category(latents_root):
    latents, classes, names = train_decodiff.normal_latents(latents_root, ["sample"])
    rows = read_index(latents_root / "sample")
    normal = [r for r in rows if r.split == "train" and r.source == "real" and r.label == 0]
    assert names == ["sample/tile", "sample/weave"]
    assert len(latents) == len(normal) and latents.dtype == torch.float32
    assert classes.tolist() == [names.index(f"sample/{r.category}") for r in normal]
    assert not any(r.split == "val" for r in normal)  # the validation split fits thresholds; it is never trained on


def run(latents_root: Path, tmp: Path, kill_after: int | None = None):
    log = KillAfter(kill_after) if kill_after is not None else None
    return registry.get("decodiff").train(config(), TrainJob(latents_root, ROOT, tmp / "queries", tmp / "out", tmp / "ckpt", log, "v1"))


def test_the_unet_learns_and_a_killed_run_resumes_bit_for_bit(latents_root, tmp_path):
    history = run(latents_root, tmp_path / "a")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["mse"] < history[0]["mse"]  # it learns: the deviation it predicts gets closer
    learned = load_file(tmp_path / "a/out/model.safetensors")
    record = json.loads((tmp_path / "a/out/model.json").read_text())
    assert record["method"] == "decodiff" and record["categories"] == ["sample/tile", "sample/weave"]
    assert record["latent_shape"] == [4, 16, 16]  # 64 px through the tiny VAE's factor 4
    assert not (tmp_path / "a/ckpt").exists()  # finished: no checkpoint left to resume into stale outputs
    model, _, _ = load_trained(tmp_path / "a/out")
    assert model.vae is not None and all(torch.equal(model.unet.state_dict()[k], learned[k]) for k in learned)

    with pytest.raises(Kill):
        run(latents_root, tmp_path / "b", kill_after=1)
    assert (tmp_path / "b/ckpt").is_dir() and not (tmp_path / "b/out").exists()  # a killed first run leaves no empty output folder
    resumed = run(latents_root, tmp_path / "b")
    assert [row["epoch"] for row in resumed] == [1, 2, 3] and resumed == history
    again = load_file(tmp_path / "b/out/model.safetensors")
    assert all(torch.equal(learned[k], again[k]) for k in learned)


@pytest.mark.parametrize(
    "block, message",
    [
        ({"reverse_steps": 11}, "decodiff.reverse_steps: must be <= decodiff.timesteps=10"),
        ({"channels": [8, 8, 8, 8, 8, 8]}, "decodiff.channels: 6 levels halve the 16x16 latents"),
    ],
)
def test_steps_and_levels_that_cannot_work_are_refused(block, message):
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        config(**block)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")  # no training here
def test_the_first_epoch_learns_at_the_warm_up_rate_and_a_resumed_run_goes_on_with_the_schedule():
    """Epoch e runs at the warm-up-then-cosine multiplier of e + 1: lr / warmup in the first epoch, not 0."""
    def optimiser() -> torch.optim.Optimizer:
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)

    opt = optimiser()
    schedule = train_decodiff.lr_schedule(opt, warmup=10, epochs=300, done=0)
    rates = []
    for _ in range(12):
        rates.append(opt.param_groups[0]["lr"])
        schedule.step()
    assert rates[0] == pytest.approx(1e-5) and rates[9] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10])) and rates[11] < rates[10] < rates[9]
    resumed = optimiser()
    resumed.load_state_dict(opt.state_dict() | {"param_groups": [{**opt.param_groups[0], "lr": rates[5]}]})
    train_decodiff.lr_schedule(resumed, warmup=10, epochs=300, done=5)
    assert resumed.param_groups[0]["lr"] == pytest.approx(rates[5])
