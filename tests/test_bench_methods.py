"""The methods' benchmark runs their real steps and reports every figure (speeds live in BENCHMARKS.md)."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from d2dprompt.bench import methods as bench_methods


def test_tiny_scale_times_an_epoch_and_inference_of_every_benchmarked_method(tmp_path):
    app = typer.Typer()
    app.command()(bench_methods.main)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["--scale", "tiny", "--images", "16", "--steps", "3", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"anomalyclip", "draem", "decodiff"}
    for row in rows.values():
        assert row["train_step_ms"] > 0 and row["infer_ms_per_image"] > 0 and row["epoch_s"] > 0
        assert row["loss_last"] < row["loss_first"], row  # the timed steps are real optimiser steps on the method's loss
    assert rows["draem"]["cpu_synthesis_ms_per_image"] > 0 and rows["decodiff"]["vae_encode_ms_per_image"] > 0
    assert "| draem | 64 | 8 |" in result.output and "| decodiff | 128 | 16 |" in result.output and "| anomalyclip | 112 | 8 |" in result.output


def test_unknown_methods_and_scales_are_refused():
    app = typer.Typer()
    app.command()(bench_methods.main)
    assert "--methods: anomalyclip | draem | decodiff, got 'foo'" in " ".join(CliRunner().invoke(app, ["--methods", "draem,foo"]).output.split())
    assert "--scale: paper | tiny, got 'huge'" in CliRunner().invoke(app, ["--scale", "huge"]).output
