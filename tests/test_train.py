"""Training checkpoints: resume bit for bit, never after a code change, never from a pickle."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2dprompt.core.runtime import checkpoints
from d2dprompt.methods import registry
from d2dprompt.methods.base import TrainJob
from d2dprompt.params import params_from_dict
from d2dprompt.core.data.latent_store import write_index
from d2dprompt.pipeline.latents import encode_dataset
from d2dprompt.core.data.manifest import scan_mvtec_layout
from d2dprompt.pipeline.queries import cache_queries
from tests.conftest import ROOT

EPOCHS = 4


def config(mode: str, resident_gb: float | str = "auto", fewshot: dict | None = None):
    return params_from_dict(
        {
            "fewshot": fewshot or {},
            "download": {"categories": ["tile"]},
            "model": {"image_size": 64},
            "attention": {"mode": mode, "prompts": "joint", "recache_every": 2, "cache_resident_gb": resident_gb},
            "latents": {"synthetic_per_image": 1},
            "train": {"epochs": EPOCHS, "batch_size": 8},
        }
    )


@pytest.fixture(scope="module")
def latents_root(tmp_path_factory, tiny) -> Path:
    root = tmp_path_factory.mktemp("latents")
    cfg = config("cached")
    rows = scan_mvtec_layout(ROOT / "sample", "sample", ["tile"])
    tensors, index = encode_dataset(tiny, ROOT / "sample", rows, 64, cfg.latents, torch.device("cpu"), "latents")
    (root / "sample").mkdir()
    save_file(tensors, root / "sample" / "latents.safetensors")
    write_index(index, root / "sample" / "index.csv")
    return root


@pytest.fixture(scope="module")
def queries_root(tmp_path_factory, latents_root) -> Path:
    out = tmp_path_factory.mktemp("queries") / "queries"
    cache_queries(config("cached"), latents_root, out)
    return out


class Kill(Exception):
    """Stands for the process dying right after an epoch's checkpoint was written."""


class KillAfter:
    def __init__(self, epoch: int):
        self.epoch = epoch

    def log_metrics(self, metrics, step=None):
        if step == self.epoch:
            raise Kill


def trained(mode, latents_root, queries_root, out: Path, checkpoint: Path, kill_after: int | None = None, code: str = "v1", resident_gb: float = 8.0,
            fewshot: dict | None = None):
    log = KillAfter(kill_after) if kill_after is not None else None
    registry.get("d2dprompt").train(config(mode, resident_gb, fewshot), TrainJob(latents_root, latents_root, queries_root, out, checkpoint, log, code))
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, latents_root, queries_root):
    results = {}
    for mode in ("cached", "full"):
        tmp = tmp_path_factory.mktemp(f"uninterrupted-{mode}")
        results[mode] = trained(mode, latents_root, queries_root, tmp / "out", tmp / "ckpt")
    return results


@pytest.mark.parametrize("mode, kill_after", [("cached", 1), ("cached", 2), ("cached", 3), ("full", 3)])
def test_a_killed_run_resumes_bit_for_bit(tmp_path, capsys, latents_root, queries_root, uninterrupted, mode, kill_after):
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Kill):
        trained(mode, latents_root, queries_root, tmp_path / "out", checkpoint, kill_after=kill_after)
    assert checkpoint.is_dir() and not (tmp_path / "out").exists()  # a killed first run leaves no empty output folder
    resumed = trained(mode, latents_root, queries_root, tmp_path / "out", checkpoint)
    assert f"resuming after epoch {kill_after}" in capsys.readouterr().out
    assert resumed.keys() == uninterrupted[mode].keys()
    for name, value in resumed.items():
        assert torch.equal(value, uninterrupted[mode][name]), name


def test_a_streamed_query_cache_trains_to_the_same_bits_as_a_resident_one(tmp_path, latents_root, queries_root, uninterrupted):
    """attention.cache_resident_gb: 0 streams the rows with prefetching (and keeps re-cached queries in host memory);
    the default reads the small cache whole. The prompts come out identical."""
    streamed = trained("cached", latents_root, queries_root, tmp_path / "out", tmp_path / "ckpt", resident_gb=0)
    assert streamed.keys() == uninterrupted["cached"].keys()
    assert all(torch.equal(streamed[k], uninterrupted["cached"][k]) for k in streamed)


def test_the_resident_query_cache_takes_at_most_a_quarter_of_the_machine_by_default(queries_root):
    """attention.cache_resident_gb=auto bounds the resident cache by the device's memory, not a fixed 8 GB that a
    full-size dataset's cache fills on a 16 GB machine; a cache above the budget streams."""
    from d2dprompt.methods.d2dprompt.query_cache import QueryCache
    from d2dprompt.methods.d2dprompt.train import placed, resident_budget

    cpu = torch.device("cpu")
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert config("cached").attention.cache_resident_gb == "auto"
    assert resident_budget("auto", cpu) == ram // 4
    assert resident_budget(2.5, cpu) == int(2.5 * 2**30)
    cache = QueryCache(path=queries_root / "queries.safetensors")
    assert placed(cache, config("cached"), cpu)._file is None  # the sample's few MB: read whole
    assert placed(cache, config("cached", resident_gb=cache.nbytes / 2**30 / 2), cpu) is cache  # above the budget: streamed


def test_query_cache_rows_are_the_same_resident_streamed_and_prefetched(queries_root):
    from d2dprompt.methods.d2dprompt.query_cache import QueryCache

    streamed = QueryCache(path=queries_root / "queries.safetensors")
    resident = streamed.resident(torch.device("cpu"))
    assert resident.nbytes == streamed.nbytes > 0
    n = next(iter(resident._tensors.values())).shape[0]
    plan = [torch.randperm(n, generator=torch.Generator().manual_seed(i))[:5] for i in range(4)]
    streamed.prefetch(plan)
    other = torch.tensor([0, 1])
    asked = [plan[0], other, plan[1], plan[2], plan[3]]  # a call off the plan (cache_drift) reads for itself
    for rows in asked:
        got, want = streamed.batch(rows, torch.device("cpu")), resident.batch(rows, torch.device("cpu"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not streamed._ahead and not streamed._plan  # every planned batch was handed over


def test_a_change_of_the_few_shot_memory_alone_builds_the_memory_without_retraining_the_prompts(tmp_path, capsys, latents_root,
                                                                                                 queries_root, uninterrupted):
    """The prompts are not a function of `fewshot`: a finished run keeps its checkpoint (not the refreshed query
    caches), and a run that changes only `fewshot` (DVC reruns train@d2dprompt for it) resumes with every epoch done,
    builds the memory, and keeps the very prompts. Before, `fewshot.k=4` retrained all epochs first."""
    trained("cached", latents_root, queries_root, tmp_path / "out", tmp_path / "ckpt")
    assert (tmp_path / "ckpt").is_dir() and not (tmp_path / "ckpt-queries").exists()
    capsys.readouterr()
    with_memory = trained("cached", latents_root, queries_root, tmp_path / "memory", tmp_path / "ckpt", fewshot={"k": 2})
    printed = capsys.readouterr().out
    assert "only the few-shot memory is built" in printed and "epoch 1:" not in printed, printed
    assert set(with_memory) > set(uninterrupted["cached"])  # the memory's tensors beside the prompts
    assert all(torch.equal(with_memory[k], uninterrupted["cached"][k]) for k in uninterrupted["cached"])
    retrained = trained("cached", latents_root, queries_root, tmp_path / "other", tmp_path / "ckpt", code="v2")
    assert "epoch 1:" in capsys.readouterr().out and retrained.keys() == uninterrupted["cached"].keys()  # other code: trains


def test_a_code_change_trains_from_scratch(tmp_path, capsys, latents_root, queries_root, uninterrupted):
    with pytest.raises(Kill):
        trained("cached", latents_root, queries_root, tmp_path / "out", tmp_path / "ckpt", kill_after=1, code="v1")
    # tamper with the stored prompts: resuming them would show in the result
    state = checkpoints.load_state(tmp_path / "ckpt")
    state.weights = {k: v + 1 for k, v in state.weights.items()}
    checkpoints.save_state(state, tmp_path / "ckpt")
    result = trained("cached", latents_root, queries_root, tmp_path / "out", tmp_path / "ckpt", code="v2")
    assert "training from scratch" in capsys.readouterr().out
    assert all(torch.equal(v, uninterrupted["cached"][k]) for k, v in result.items())


def test_code_digest_follows_every_source_file(tmp_path):
    package = tmp_path / "d2dprompt"
    package.mkdir()
    (package / "losses.py").write_text("CLAMP = 1e-6\n")
    (package / "train.py").write_text("x = 1\n")
    before = checkpoints.code_digest(package)
    (package / "losses.py").write_text("CLAMP = 1e-5\n")
    assert checkpoints.code_digest(package) != before
    assert checkpoints.code_digest() == checkpoints.code_digest()  # the installed package: stable


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "d2dprompt-pickle-ran"


def test_a_checkpoint_with_foreign_json_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"prompts/ctx": torch.zeros(2)}, folder / checkpoints.STATE_TENSORS)
    (folder / checkpoints.STATE_JSON).write_text('{"history": []}')
    with pytest.raises(checkpoints.CheckpointError, match=r"not a readable checkpoint \(KeyError\)"):
        checkpoints.load_state(folder)


@pytest.mark.parametrize("where", ["file", "state"])
def test_a_pickle_at_the_checkpoint_path_is_refused_without_running(tmp_path, latents_root, queries_root, where):
    MARKER.unlink(missing_ok=True)
    checkpoint = tmp_path / "ckpt"
    if where == "file":  # the old single-file location, or any file placed at the path
        checkpoint.write_bytes(pickle.dumps(Exploit()))
    else:  # a pickle posing as the tensor file inside the folder
        checkpoint.mkdir()
        (checkpoint / checkpoints.STATE_TENSORS).write_bytes(pickle.dumps(Exploit()))
        (checkpoint / checkpoints.STATE_JSON).write_text("{}")
    with pytest.raises(checkpoints.CheckpointError, match="remove it to train from scratch"):
        trained("cached", latents_root, queries_root, tmp_path / "out", checkpoint)
    assert not MARKER.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()

