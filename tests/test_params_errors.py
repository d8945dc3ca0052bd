"""A bad params file stops every stage before any model loads, with one line naming the key and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from d2dprompt.pipeline import download, evaluate, latents, predict, queries, train
from d2dprompt.core.runtime.config import ParamsError
from d2dprompt.params import load_params, params_from_dict
from d2dprompt.core.vae_factor import SD_VAE_FACTOR, vae_factor
from tests.conftest import ROOT

# (params.yaml text, a part of the one-line message after "<file>: ")
CASES = {
    # out of range
    "epochs negative": ("train:\n  epochs: -3\n", "train.epochs: must be >= 1, got -3"),
    "epochs zero": ("train:\n  epochs: 0\n", "train.epochs: must be >= 1, got 0 (an untrained baseline is train.untrained: true)"),
    "lr": ("train:\n  lr: -1\n", "train.lr: must be > 0, got -1"),
    "betas count": ("train:\n  betas: [0.5]\n", "train.betas: must hold exactly 2 values, each in [0, 1), got [0.5]"),
    "betas range": ("train:\n  betas: [0.5, 1.0]\n", "train.betas[1]: must be in [0, 1), got 1.0"),
    "train batch": ("train:\n  batch_size: 0\n", "train.batch_size: must be >= 1, got 0"),
    "map size": ("evaluate:\n  map_size: 0\n", "evaluate.map_size: must be >= 1, got 0"),
    "sigma": ("evaluate:\n  sigma: -4\n", "evaluate.sigma: must be >= 0, got -4"),
    "top percent": ("evaluate:\n  top_percent: 0\n", "evaluate.top_percent: must be in (0, 100], got 0"),
    "aupro limit": ("evaluate:\n  aupro_fpr_limit: 2\n", "evaluate.aupro_fpr_limit: must be in (0, 1], got 2"),
    "synthetic per image": ("latents:\n  synthetic_per_image: -1\n", "latents.synthetic_per_image: must be >= 0, got -1"),
    "latents batch": ("latents:\n  batch_size: 0\n", "latents.batch_size: must be >= 1, got 0"),
    "evaluate batch": ("evaluate:\n  batch_size: 0\n", "evaluate.batch_size: must be >= 1, got 0"),
    "val fraction": ("latents:\n  val_fraction: 1.0\n", "latents.val_fraction: must be in [0, 1), got 1.0"),
    "perlin threshold": ("latents:\n  perlin_threshold: 1.0\n", "latents.perlin_threshold: must be in (-1, 1), got 1.0"),
    "perlin scale": ("latents:\n  perlin_scale_max: 0\n", "latents.perlin_scale_max: must be >= 1, got 0"),
    "latents seed": ("latents:\n  seed: -1\n", "latents.seed: must be >= 0, got -1"),
    "min change": ("latents:\n  min_change: -1\n", "latents.min_change: must be >= 0, got -1"),
    "beta max": ("latents:\n  beta_max: 1.0\n", "latents.beta_max: must be in [0, 1), got 1.0"),
    "beta order": ("latents:\n  beta_min: 0.5\n  beta_max: 0.3\n", "latents.beta_min: must be <= latents.beta_max=0.3, got 0.5"),
    "timestep": ("model:\n  timestep: -1\n", "model.timestep: must be >= 0, got -1"),
    "image size": ("model:\n  image_size: 0\n", "model.image_size: must be in [1, 2048], got 0"),
    "n_ctx": ("prompt:\n  n_ctx: 0\n", "prompt.n_ctx: must be >= 1, got 0"),
    "t_n_ctx above n_ctx": ("prompt:\n  n_ctx: 4\n  t_n_ctx: 5\n", "prompt.t_n_ctx: must lie in 0..prompt.n_ctx=4, got 5"),
    "t_n_ctx negative": ("prompt:\n  t_n_ctx: -1\n", "prompt.t_n_ctx: must be >= 0, got -1"),
    "depth": ("prompt:\n  depth: 0\n", "prompt.depth: must be >= 1, got 0"),
    "init std": ("prompt:\n  init_std: 0\n", "prompt.init_std: must be > 0, got 0"),
    "loss weight": ("loss:\n  dice: -1\n", "loss.dice: must be >= 0, got -1"),
    "focal gamma": ("loss:\n  focal_gamma: -0.5\n", "loss.focal_gamma: must be >= 0, got -0.5"),
    "image top percent": ("loss:\n  image_top_percent: 101\n", "loss.image_top_percent: must be in (0, 100], got 101"),
    "sensitivity": ("evaluate:\n  sensitivity: 1.5\n", "evaluate.sensitivity: must be in [0, 1], got 1.5"),
    "opening kernel": ("evaluate:\n  opening_kernel: -1\n", "evaluate.opening_kernel: must be >= 0, got -1"),
    "min area": ("evaluate:\n  min_area: -1\n", "evaluate.min_area: must be >= 0, got -1"),
    "grid cases": ("evaluate:\n  grid_cases: -1\n", "evaluate.grid_cases: must be >= 0, got -1"),
    "recache": ("attention:\n  recache_every: -1\n", "attention.recache_every: must be >= 0, got -1"),
    "resident budget": ("attention:\n  cache_resident_gb: lots\n", "attention.cache_resident_gb: must be auto or a size in GB >= 0, got 'lots'"),
    "levels empty": ("attention:\n  levels: []\n", "attention.levels: must hold at least 1 value, each in [0, 8], got []"),
    "levels negative": ("attention:\n  levels: [0, -1]\n", "attention.levels[1]: must be in [0, 8], got -1"),
    "levels repeated": ("attention:\n  levels: [0, 0]\n", "attention.levels: must not list 0 twice, got [0, 0]"),
    # choices
    "device": ("model:\n  device: gpu\n", "model.device: must be one of auto | cpu | cuda | cuda:N, got 'gpu'"),
    "precision": ("model:\n  precision: fp8\n", "model.precision: must be one of auto | fp32 | bf16, got 'fp8'"),
    "fp16": ("model:\n  precision: fp16\n", "model.precision: fp16 is refused: fp16 training needs a gradient scaler, "
             "which the pipeline does not have; use bf16 (or auto)"),
    "mode": ("attention:\n  mode: fast\n", "attention.mode: must be one of cached | full, got 'fast'"),
    "prompts": ("attention:\n  prompts: both\n", "attention.prompts: must be one of joint | paired, got 'both'"),
    "supervision": ("train:\n  supervision: weak\n", "train.supervision: must be one of synthetic | annotated, got 'weak'"),
    "score": ("evaluate:\n  score: mean\n", "evaluate.score: must be one of max | topk | fused, got 'mean'"),
    "threshold": ("evaluate:\n  threshold: otsu\n", "evaluate.threshold: must be one of f1 | fixed, got 'otsu'"),
    "source": ("download:\n  archives: [kaggle]\n", "download.archives[0]: must be one of mvtec | visa | btad | mpdd | mvtec_ad2, got 'kaggle'"),
    "folder named as an archive": ("download:\n  folders: {mvtec: /data/mine}\n", "download.folders: 'mvtec' is an archive source's name; call the folder something else"),
    "source twice": ("download:\n  archives: [mvtec, mvtec]\n", "download.archives: must not list 'mvtec' twice"),
    "merged key twice": ("loss: &l\n  dice: 1\nevaluate:\n  <<: {sigma: 1, sigma: 2}\n", "line 4: invalid YAML: duplicate key 'sigma' (first on line 4)"),
    "merged list key twice": ("evaluate:\n  <<: [{sigma: 1}, {map_size: 64,\n    map_size: 32}]\n", "line 3: invalid YAML: duplicate key 'map_size' (first on line 2)"),
    "no dataset": ("download:\n  folders: {}\n", "download.archives: no dataset: list an archive (mvtec | visa | btad | mpdd | mvtec_ad2) or a folder in download.folders"),
    "old key": ("download:\n  datasets: [sample]\n", "download.datasets: unknown key (now download.archives (mvtec | visa | ...) and download.folders (name: path))"),
    "train dataset": ("train:\n  datasets: [foo]\n", "train.datasets: 'foo' is not a dataset of download.archives or download.folders; choose from sample"),
    "evaluate dataset": ("evaluate:\n  datasets: [foo]\n", "evaluate.datasets: 'foo' is not a dataset of download.archives or download.folders; choose from sample"),
    # types and keys
    "quoted number": ("train:\n  epochs: '3'\n", "train.epochs: must be a whole number, got '3'"),
    "yaml exponent": ("train:\n  lr: 1e-3\n", "train.lr: must be a number, got '1e-3' (YAML reads 1e-3 as text: write 1.0e-3)"),
    "unknown key": ("loss:\n  sharpnes: 0.3\n", "loss.sharpnes: unknown key (did you mean 'sharpness'?); loss takes focal, dice,"),
    "not a block": ("train: 5\n", "train: must be a mapping of keys, got 5"),
    "image size too large": ("model:\n  image_size: 12800\n", "model.image_size: must be in [1, 2048], got 12800"),
    "infinite rate": ("train:\n  lr: .inf\n", "train.lr: must be a finite number, got inf"),
    "level too deep": ("attention:\n  levels: [0, 20000]\n", "attention.levels[1]: must be in [0, 8], got 20000"),
    "bootstrap too many": ("evaluate:\n  bootstrap: 10000000\n", "evaluate.bootstrap: must be in [0, 100000], got 10000000"),
    "bootstrap too few": ("evaluate:\n  bootstrap: 1\n", "evaluate.bootstrap: must be 0 (no intervals) or at least 100"),
    "confidence too low": ("evaluate:\n  confidence: 1.0e-9\n", "evaluate.confidence: must be in [0.5, 1), got 1e-09"),
    "unquoted numeric name": ("download:\n  categories: [01]\n",
                              "download.categories[0]: must be text, got 1 (YAML reads an unquoted 01 as the number 1: quote it, '01')"),
    # across blocks
    "annotated on the evaluated set": (
        "train:\n  supervision: annotated\n",
        "train.supervision: annotated trains on the test split of sample, which evaluate scores; "
        "the zero-shot protocol trains on one dataset and evaluates on another",
    ),
    "latents vs levels": (
        "model:\n  image_size: 100\n",
        "model.image_size: 100 gives 25x25 latents (VAE factor 4), not divisible by 2**1 for attention.levels=[0, 1]; use a multiple of 8",
    ),
    "not a VAE multiple": ("model:\n  image_size: 130\n", "model.image_size: 130 is not a multiple of the VAE factor 4"),
    "nccl on the cpu": ("model:\n  device: cpu\ndistributed:\n  backend: nccl\n", "distributed.backend: nccl joins GPUs, and model.device=cpu uses none; use gloo or auto"),
    "no process": ("distributed:\n  nproc: 0\n", "distributed.nproc: must be >= 1, got 0"),
    "f1 without validation rows": ("latents:\n  val_fraction: 0\n", "evaluate.threshold: f1 fits thresholds on the validation split, which latents.val_fraction=0 leaves empty"),
    # the file itself
    "malformed yaml": ("train:\n  epochs: [3\n  lr: 0.1\n", "line 3: invalid YAML: expected ',' or ']'"),
    "duplicate key": ("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n", "line 4: invalid YAML: duplicate key 'epochs' (first on line 2)"),
}


@pytest.mark.parametrize("text, expected", CASES.values(), ids=CASES.keys())
def test_load_params_names_the_key_in_one_line(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and expected in message, message


def test_untrained_is_a_setting_of_its_own():
    assert params_from_dict({}).train.untrained is False
    assert params_from_dict({"train": {"untrained": True}}).train.untrained is True


def test_vae_factor_without_weights(tmp_path, tiny, monkeypatch):
    assert vae_factor("tiny") == tiny.vae_scale  # one constant builds the tiny VAE and answers here
    folder = tmp_path / "sd"
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert vae_factor(str(folder)) == 8
    with pytest.raises(ParamsError, match=r"^model.image_size: 96 gives 12x12 latents \(VAE factor 8\), not divisible by 2\*\*3"):
        params_from_dict({"model": {"pretrained": str(folder), "image_size": 96}, "attention": {"levels": [0, 3]}})
    with pytest.raises(ParamsError, match=r"^model.pretrained: .*not a diffusers folder"):
        params_from_dict({"model": {"pretrained": str(tmp_path)}})
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    assert vae_factor("someone/uncached-model") == SD_VAE_FACTOR
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(folder / "vae" / "config.json"))
    assert vae_factor("someone/cached-model") == 8


def test_reading_params_loads_neither_torch_nor_a_model():
    code = (
        "import sys\n"
        "from d2dprompt.core.runtime.config import ParamsError\n"
        "from d2dprompt.params import params_from_dict\n"
        "try:\n"
        "    params_from_dict({'model': {'image_size': 100}})\n"
        "except ParamsError as err:\n"
        "    print(err)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'd2dprompt.core.models') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.splitlines() == [CASES["latents vs levels"][1], "[]"], out.stderr


# ---------------------------------------------------------------- stages stop before any model loads

BAD = "train:\n  epochs: 0\n"  # valid YAML, valid types: only the range check stops it
SCRATCH = ROOT / "sample" / "disc" / "test" / "scratch" / "000.png"


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the params were checked")


def _cli(main) -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command()(main)
    return app


@pytest.mark.parametrize("name", ["download", "latents", "queries", "train", "evaluate", "predict"])
def test_every_stage_checks_params_before_loading_a_model(tmp_path, monkeypatch, name):
    import d2dprompt.core.models
    import d2dprompt.trained

    monkeypatch.setattr(d2dprompt.core.models, "load_frozen", _no_model)  # the stages import them where they run
    monkeypatch.setattr(d2dprompt.trained, "load_trained", _no_model)
    params, out = tmp_path / "bad.yaml", tmp_path / "out"
    params.write_text(BAD)
    args = {
        "download": (download.app, ["--params", params, "--out", out]),
        "latents": (_cli(latents.main), ["--params", params, "--out", out]),
        "queries": (_cli(queries.main), ["--params", params, "--out", out]),
        "train": (_cli(train.main), ["--params", params, "--out", out, "--checkpoint", out / "train.pt"]),
        "evaluate": (_cli(evaluate.main), ["sample", "--params", params, "--out", out, "--metrics", out]),
        "predict": (predict.app, [SCRATCH, "--params", params, "--out", out]),
    }
    app, argv = args[name]
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.stderr.splitlines() == [f"error: {params}: {CASES['epochs zero'][1]}"]
    assert not out.exists()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "stage, case",
    [("train", "epochs zero"), ("train", "annotated on the evaluated set"), ("latents", "latents vs levels"), ("latents", "duplicate key")],
)
def test_stage_cli_exits_with_one_line_and_no_outputs(tmp_path, stage, case):
    text, expected = CASES[case]
    (tmp_path / "bad.yaml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", f"d2dprompt.pipeline.{stage}", "--params", "bad.yaml"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: bad.yaml: ") and expected in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no stages/, no checkpoint, no tracking store


def test_prompts_json_of_an_older_run_still_loads(tmp_path, tiny, monkeypatch):
    """Records written before this schema: fp16 allowed, no train.untrained / loss.image_top_percent keys."""
    from d2dprompt.core import models
    from d2dprompt.core.training import CONFIG_FILE, write_trained
    from d2dprompt.methods import registry
    from d2dprompt import trained as prompt_files
    from d2dprompt.methods.base import config_record
    from d2dprompt.params import Params
    from d2dprompt.methods.d2dprompt.model import build_segmenter

    cfg = Params()
    segmenter = build_segmenter(tiny, cfg.prompt, cfg.attention, cfg.model)
    record = config_record(registry.get("d2dprompt"), cfg)
    record["model"]["precision"] = "fp16"  # refused in params.yaml now; the record's device/precision are not read back
    del record["train"]["untrained"], record["loss"]["image_top_percent"]
    write_trained(tmp_path, segmenter.prompts.state_dict(), record, [])
    monkeypatch.setattr(models, "load_frozen", lambda pretrained, seed: tiny)
    loaded, read_back, _ = prompt_files.load_trained(tmp_path)
    assert read_back == record and loaded.timestep == cfg.model.timestep
    record["prompt"]["n_ctx"] = 0
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ParamsError, match=rf"^{tmp_path / 'model.json'}: prompt.n_ctx: must be >= 1, got 0$"):
        prompt_files.load_trained(tmp_path)


def test_a_long_list_is_checked_for_repeats_in_linear_time_and_an_oversized_file_is_refused(tmp_path):
    """100,000 evaluate.datasets entries did not finish in 600 s (a quadratic check); a 50 MB file parsed for 80 s."""
    import time

    from d2dprompt.params import load_params

    names = [f"d{i}" for i in range(100_000)]
    path = tmp_path / "params.yaml"
    path.write_text("evaluate:\n  datasets: [" + ", ".join(names + ["d7"]) + "]\n")
    start = time.monotonic()
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert time.monotonic() - start < 60
    assert str(err.value).endswith("evaluate.datasets: must not list 'd7' twice, got 100001 entries")
    path.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: {path.stat().st_size:,} bytes; a params file holds at most 1,048,576 (it is settings, not data)"
