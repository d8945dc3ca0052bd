import json
import math

import pytest
import torch
from typer.testing import CliRunner

from d2dprompt.bench import steps as bench


def test_tiny_run_writes_well_formed_rows(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--arch", "tiny", "--batch", "2", "--warmup", "1", "--steps", "1", "--modes", "full", "--prompts", "paired"]
    threads = torch.get_num_threads()
    try:  # one thread: on a busy machine two threads waiting for each other turn 2 s into 30 s
        result = CliRunner().invoke(bench.app, [*args, "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    labels = [row["label"] for row in report["rows"]]
    assert labels == ["train full+paired", "infer full+paired", "infer full+paired, no early exit"]
    for row in report["rows"]:
        assert row["batch"] == 2 and len(row["warmup_ms"]) == 1 and len(row["times_ms"]) == 1
        for key in ("step_ms", "images_per_s", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["label"], key)
        assert math.isclose(row["images_per_s"], 2000 / row["step_ms"])
        assert math.isfinite(row["peak_mib"])
    train, infer, no_exit = report["rows"]
    assert train["ratio"] == 1.0 and infer["ratio"] == 1.0  # each kind is its own full+paired baseline
    assert math.isclose(no_exit["ratio"], no_exit["step_ms"] / infer["step_ms"])
    assert report["facts"]["tiny"]["latent_side"] == 32
    assert any(line.startswith("N.A.") for line in report["targets"])
    assert "train full+paired" in result.output


def test_blob_masks_mark_every_other_image_anomalous():
    masks, labels = bench.blob_masks(4, 16, seed=0)
    assert labels.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert (masks[labels == 1].flatten(1).sum(1) > 0).all() and masks[labels == 0].sum() == 0


def test_targets_compare_cached_with_full_paired_of_sd21():
    def row(kind, mode, prompts, ms, batch=8):
        return bench.Row("sd21", kind, mode, prompts, True, batch, ms, batch * 1000 / ms, 100.0)

    rows = [row("train", "full", "paired", 1000.0), row("train", "cached", "paired", 40.0), row("train", "cached", "joint", 100.0)]
    bench.add_ratios(rows)
    lines = bench.evaluate_targets(rows, torch.device("cpu"), "cpu", "auto")
    assert any(line.startswith("PASS") and "paired" in line and "25.0x" in line for line in lines)
    assert any(line.startswith("FAIL") and "joint" in line and "10.0x" in line for line in lines)
    assert sum(line.startswith("N.A.") for line in lines) == 2  # GPU memory and H100 latency


def test_unknown_arch_is_rejected_by_name():
    with pytest.raises(bench.typer.BadParameter, match="--arch='sd15'"):
        bench._split("sd15", tuple(bench.ARCHS), "--arch")


def test_gpu_targets_judge_memory_at_batch_8_and_latency_on_an_h100_only():
    def row(kind, mode, prompts, ms, peak_mib, batch=8):
        return bench.Row("sd21", kind, mode, prompts, True, batch, ms, batch * 1000 / ms, peak_mib)

    rows = [row("train", "full", "paired", 800.0, 9000.0), row("train", "cached", "joint", 20.0, 2000.0), row("infer", "full", "joint", 240.0, 500.0)]
    bench.add_ratios(rows)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    h100 = bench.evaluate_targets(rows, cuda, "NVIDIA H100 80GB HBM3", "auto")
    assert any(line.startswith("PASS") and "40.0x" in line for line in h100)
    assert any(line.startswith("PASS") and "2.10 GB" in line for line in h100)  # 2000 MiB
    assert any(line.startswith("FAIL") and "30.0 ms" in line for line in h100)  # 240 ms / 8 images
    other = bench.evaluate_targets(rows, cuda, "NVIDIA A100-SXM4-80GB", "fp32")
    assert sum(line.startswith("N.A.") for line in other) == 2  # fp32 is not mixed precision; not an H100


@pytest.mark.parametrize("cache", ["resident", "streamed"])
def test_the_step_profile_times_every_part_of_a_cached_step(cache):
    from typer.testing import CliRunner

    from d2dprompt.bench import profile_step

    app = profile_step.app_for(profile_step.main, profile_step.__doc__)
    result = CliRunner().invoke(app, ["--arch", "tiny", "--steps", "1", "--rows", "8", "--batch", "4", "--cache", cache])
    assert result.exit_code == 0, result.output
    parts = {line.split("|")[1].strip() for line in result.output.splitlines() if line.startswith("| ")}
    assert set(profile_step.PARTS) <= parts and f"query cache {cache} (8 rows" in result.output
    assert "Self CPU" in result.output  # the profiler's table of the whole step


def test_the_few_shot_benchmark_sizes_the_memory_from_the_captured_features_and_times_the_knn():
    import re

    from typer.testing import CliRunner

    from d2dprompt.bench import fewshot

    app = fewshot.app_for(fewshot.main, fewshot.__doc__)
    result = CliRunner().invoke(app, ["--arch", "tiny", "--shots", "1,4", "--references", "20", "--memory-mb", "2", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    per_image = float(re.search(r"features of one image: ([\d.]+) MiB", result.output).group(1))
    rows = {int(line.split("|")[1]): line.split("|")[2:] for line in result.output.splitlines() if re.match(r"\| \d+ \|", line)}
    assert set(rows) == {1, 4} and abs(float(rows[4][0]) - round(4 * per_image)) <= 1 and float(rows[4][1]) > 0
    assert "keeps a coreset of" in result.output and "coreset of the largest layer" in result.output  # 20 images exceed 2 MiB


def test_the_onnx_benchmark_times_both_backends_and_the_onnxruntime_process_never_loads_torch():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "d2dprompt.bench.onnx", "--arch", "tiny", "--threads", "1", "--images", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"torch", "onnx"}
    for backend, (ms, peak, torch_loaded) in rows.items():
        assert float(ms) > 0 and float(peak) > 0
        assert torch_loaded == str(backend == "torch")


def test_the_cache_dtype_benchmark_reads_a_float16_cache_back_from_int8_at_half_the_bytes(workspace):
    """bench.cache_dtype on the session's float16 cache: int8 takes about half the bytes per row and the maps at the
    cache's prompts move by a small fraction of their range (README / BENCHMARKS.md quote its output)."""
    import re

    from d2dprompt.bench import cache_dtype

    result = CliRunner().invoke(_app(cache_dtype),
                                ["--params", str(workspace / "params.yaml"), "--latents", str(workspace / "stages/latents"),
                                 "--queries", str(workspace / "stages/queries")])
    assert result.exit_code == 0, result.output
    f16, i8 = map(float, re.search(r"float16 ([\d.]+), int8 ([\d.]+)", result.output).groups())
    assert 0.49 < i8 / f16 < 0.53
    share = float(re.search(r"\(([\d.]+)% of the range\)", result.output).group(1))
    assert 0 < share < 1, result.output


def _app(module):
    from d2dprompt.core.runtime.cli import app_for

    return app_for(module.main, module.__doc__)
