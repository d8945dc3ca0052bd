"""The ablation command: its plan, its reading of real `dvc exp show --json` output, its statistics, and one real run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from d2dprompt.pipeline import ablate
from tests.conftest import ROOT, run_cmd
from tests.test_readme import check_narrow_view

DATA = ROOT / "tests" / "data"


def test_plan_gives_one_run_per_experiment_and_seed_with_the_experiments_overrides_winning():
    runs = ablate.plan_runs("no_dice,baseline", 2, ["train.epochs=3", "loss.dice=1"])
    assert [r.name for r in runs] == ["baseline-s0", "baseline-s1", "no_dice-s0", "no_dice-s1"]  # EXPERIMENTS order
    no_dice = runs[3]
    assert ablate.queue_argv(no_dice) == [
        "dvc", "exp", "run", "--queue", "-S", "train.epochs=3", "-S", "loss.dice=0",
        "-S", "train.seed=1", "-S", "latents.seed=1", "--name", "no_dice-s1",
    ]
    assert "loss.dice=1" in runs[0].overrides  # --set applies where the experiment says nothing


def test_the_few_shot_protocol_varies_only_the_draw_of_the_reference_images():
    runs = ablate.plan_runs("fewshot_k1,fewshot_k4", 3, ["train.epochs=3"])
    assert [r.name for r in runs] == [f"fewshot_k{k}-s{s}" for k in (1, 4) for s in range(3)]
    assert ablate.queue_argv(runs[5]) == [
        "dvc", "exp", "run", "--queue", "-S", "train.epochs=3", "-S", "fewshot.k=4", "-S", "methods=[d2dprompt,patchknn]",
        "-S", "fewshot.seed=2", "--name", "fewshot_k4-s2",
    ]  # training and the validation split stay as params.yaml has them: three draws of the same model
    with pytest.raises(ablate.AblationError, match="fewshot.seed is set per run by --seeds"):
        ablate.plan_runs("fewshot_k1", 1, ["fewshot.seed=4"])


def test_dvcs_add_and_remove_key_forms_pass_through_to_every_run():
    (run,) = ablate.plan_runs("baseline", 1, ["~download.folders.sample", "+download.folders.bottles=/data/bottles"])
    assert ablate.queue_argv(run)[4:8] == ["-S", "~download.folders.sample", "-S", "+download.folders.bottles=/data/bottles"]


@pytest.mark.parametrize("args, message", [
    (("nope", 1, []), "unknown nope"),
    ((None, 0, []), "--seeds 0"),
    ((None, 1, ["train.seed=4"]), "set per run by --seeds"),
    ((None, 1, ["epochs"]), "expected key=value"),
])
def test_a_bad_request_is_refused_in_one_line(args, message):
    with pytest.raises(ablate.AblationError, match=message):
        ablate.plan_runs(*args)


def test_dry_run_prints_the_dvc_commands_and_runs_nothing():
    result = CliRunner().invoke(ablate.app, ["--dry-run", "--only", "paired", "--seeds", "2", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "dvc exp run --queue -S attention.prompts=paired -S train.seed=0 -S latents.seed=0 --name paired-s0"
    assert lines[2] == "dvc queue start -j 2"


def test_real_exp_show_output_is_read_per_metrics_file():
    entries = ablate.parse_exp_show(json.loads((DATA / "exp_show_methods.json").read_text()))
    assert set(entries) == {"wrong-aura", "gooey-deep"}
    entry = entries["wrong-aura"]
    assert entry.state == "success" and entry.rev.startswith("6aea33b")
    assert set(entry.metrics) == {"d2dprompt/sample", "d2d/sample", "anomalyclip/sample"}
    assert entry.metrics["d2d/sample"]["image_AUROC"] == pytest.approx(0.4)
    assert ablate.metrics_label("metrics/sample.json") == "sample"


def test_queued_and_running_experiments_carry_no_metrics():
    entries = ablate.parse_exp_show(json.loads((DATA / "exp_show_queue.json").read_text()))
    assert {n: e.state for n, e in entries.items()} == {"baseline-s0": "running", "level1-s2": "queued", "wrong-aura": "success"}
    assert entries["baseline-s0"].metrics == {} and entries["level1-s2"].metrics == {}


def test_mean_and_sample_std_over_seeds_match_numpy():
    values = [0.61, 0.72, 0.58]
    stats = ablate.summarize(values + [None])
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert ablate.summarize([0.5])["std"] is None  # one seed has no spread


def test_the_seed_table_says_when_a_row_cannot_be_told_apart_from_the_baseline():
    """Paired over seeds: a row that moves with the baseline seed by seed is told apart by a small steady gain; a
    row whose seeds scatter around the baseline's is not."""
    runs = ablate.plan_runs("baseline,no_image,no_dice", 4, [])
    base = [0.60, 0.70, 0.65, 0.75]
    values = {"baseline": base, "no_image": [b + 0.02 for b in base], "no_dice": [0.70, 0.60, 0.72, 0.66]}
    entries = {run.name: ablate.Entry(run.name, f"rev-{run.name}", "success", metrics={"d2dprompt/sample": {
        "image_AUROC": values[run.experiment][run.seed], "pixel_AUROC": 0.8, "pixel_AUPRO": 0.5, "AUPIMO": 0.1}}) for run in runs}
    rows = {r["experiment"]: r for r in ablate.aggregate(runs, entries)}
    steady, scattered = rows["no_image"]["vs_baseline"]["image_AUROC"], rows["no_dice"]["vs_baseline"]["image_AUROC"]
    assert steady["apart"] and steady["diff"] == pytest.approx(0.02) and steady["p_value"] == 0.0
    assert not scattered["apart"] and scattered["lo"] < 0 < scattered["hi"]
    assert rows["no_image"]["vs_baseline"]["pixel_AUROC"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0, "seeds": 4, "apart": False}
    table = ablate.format_markdown(list(rows.values()), "abcdef0", {})
    assert "| 4 | image_AUROC +0.020 (p=0) |" in table and "| 4 | cannot be told apart (p >= 0.05 on every metric) |" in table
    assert rows["baseline"]["image_AUROC"]["lo"] < 0.675 < rows["baseline"]["image_AUROC"]["hi"]


def test_report_aggregates_seeds_per_experiment_and_file(tmp_path):
    runs = ablate.plan_runs("baseline,no_image", 2, [])
    entries = {}
    for i, run in enumerate(runs):
        means = {"image_AUROC": 0.5 + 0.1 * i, "pixel_AUROC": 0.8, "pixel_AUPRO": 0.6 - 0.05 * i}
        entries[run.name] = ablate.Entry(run.name, f"rev{i}", "success", metrics={"d2dprompt/sample": means})
    entries["no_image-s1"] = ablate.Entry("no_image-s1", "rev3", "failed")
    rows = ablate.aggregate(runs, entries)
    assert [(r["experiment"], r["n"]) for r in rows] == [("baseline", 2), ("no_image", 1)]
    assert rows[0]["image_AUROC"]["mean"] == pytest.approx(0.55) and rows[0]["image_AUROC"]["std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    ablate.write_report(tmp_path, rows, runs, "abcdef0", {"no_image-s1": "failed"}, queued=True)
    table = (tmp_path / "ablation.md").read_text()
    assert "| baseline | – | d2dprompt/sample | 0.550 ± 0.071 [-0.085, 1.185] | 0.800 ± 0.000 [0.800, 0.800] | 0.575 ± 0.035 [0.257, 0.893] | – | 2 | – |" in table
    assert "| 1 | n/a (needs 2 seeds of it and of baseline) |" in table  # no_image has one seed left
    assert "`no_image-s1`: failed" in table
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "ablation.json").read_text())["results"][1]["runs"][0]["name"] == "no_image-s0"


@pytest.mark.e2e
def test_a_real_ablation_queues_runs_and_reports_through_dvc(repo_copy, tmp_path):
    """2 experiments x 2 seeds through `dvc exp run --queue` in a fresh clone of the copy (1 epoch, 64 px: the
    plumbing, not the numbers, is under test)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo_copy), str(clone)], check=True)
    args = [sys.executable, "-m", "d2dprompt.pipeline.ablate", "--only", "baseline,no_image", "--seeds", "2", "--poll", "2",
            "--set", "train.epochs=1", "--set", "model.image_size=64", "--out", "report"]
    run_cmd(args, clone, timeout=1500)
    record = json.loads((clone / "report/ablation.json").read_text())
    assert [(r["experiment"], r["metrics_file"], r["n"]) for r in record["results"]] == [("baseline", "d2dprompt/sample", 2), ("no_image", "d2dprompt/sample", 2)]
    seeds = record["results"][0]["runs"]
    assert seeds[0]["image_AUROC"] != seeds[1]["image_AUROC"] or seeds[0]["pixel_AUPRO"] != seeds[1]["pixel_AUPRO"]  # seeds differ
    assert (clone / "report/ablation.png").is_file() and record["without_result"] == {}
    again = run_cmd([*args, "--report-only"], clone)  # the same table from DVC alone
    assert "| baseline |" in again.stdout
    check_narrow_view(clone, "mean.pixel_AUPRO", methods=1)  # one metrics file: DVC names the column without its file


def test_waiting_outlasts_a_transient_exp_show_failure(monkeypatch):
    calls = []

    def flaky(rev):
        calls.append(rev)
        if len(calls) == 1:
            raise ablate.AblationError("directory '.dvc/tmp/exps/tmpx/.dvc' does not exist")
        return {"a-s0": ablate.Entry("a-s0", "r", "success")}

    monkeypatch.setattr(ablate, "exp_show", flaky)
    monkeypatch.setattr(ablate.time, "sleep", lambda _: None)
    assert ablate.wait_for(["a-s0"], "rev", 0.1)["a-s0"].state == "success" and len(calls) == 2
    monkeypatch.setattr(ablate, "exp_show", lambda rev: (_ for _ in ()).throw(ablate.AblationError("broken")))
    with pytest.raises(ablate.AblationError, match="broken"):
        ablate.wait_for(["a-s0"], "rev", 0.1)


def test_a_dvc_call_that_hangs_is_stopped_and_reported_as_a_failure_to_retry():
    import sys

    with pytest.raises(ablate.AblationError, match="did not answer within 0.5 s"):
        ablate._call([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


def test_a_saved_report_rebuilds_the_same_table_without_dvc(tmp_path):
    runs = ablate.plan_runs("baseline,no_dice", 2, [])
    entries = {run.name: ablate.Entry(run.name, f"rev{i}", "success", metrics={"d2dprompt/sample": {
        "image_AUROC": 0.5 + 0.1 * i, "pixel_AUROC": 0.8 - 0.01 * i, "pixel_AUPRO": 0.6, "AUPIMO": 0.1 * i}}) for i, run in enumerate(runs)}
    rows = ablate.aggregate(runs, entries)
    ablate.write_report(tmp_path / "first", rows, runs, "abcdef0", {}, queued=True)
    again_runs, again_entries, rev = ablate.from_report(tmp_path / "first/ablation.json")
    assert rev == "abcdef0" and again_runs == runs
    assert ablate.format_markdown(ablate.aggregate(again_runs, again_entries), rev, {}) == ablate.format_markdown(rows, "abcdef0", {})
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ablate.AblationError, match=r"broken.json: not an ablation report \(KeyError"):
        ablate.from_report(tmp_path / "broken.json")
