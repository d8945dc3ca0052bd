"""Batch zero-shot D2D-Prompt (fewshot.mutual) through the real train, evaluate and predict CLIs on the sample:
no memory is kept, evaluate scores each category's images against each other, and predict says why it cannot."""

from __future__ import annotations

import json

from tests.conftest import stage, write_params


def test_batch_zero_shot_runs_through_train_and_evaluate_and_predict_refuses_it_in_one_line(workspace, tmp_path):
    params = str(write_params(tmp_path, fewshot={"mutual": True, "fusion": 0.5}, train={"epochs": 1}))
    trained = tmp_path / "mutual"
    stage("train", "--params", params, "--out", str(trained), "--checkpoint", str(tmp_path / "ckpt"), cwd=workspace)
    record = json.loads((trained / "model.json").read_text())
    assert record["fewshot"]["mutual"] and record["categories"] == ["sample/disc", "sample/tile", "sample/weave"]
    for entry in record["memory"].values():  # no reference image: only the normalisation, from the validation split's normal images
        assert entry["references"] == [] and entry["rows"] == 0 and entry["memory_stats"][1] > 0 and entry["prompt_stats"][1] > 0
    stage("evaluate", "sample", "--params", params, "--trained", str(trained), "--out", str(tmp_path / "evaluate"),
          "--metrics", str(tmp_path / "metrics"), cwd=workspace)
    mean = json.loads((tmp_path / "metrics/sample.json").read_text())["mean"]
    assert 0 <= mean["image_AUROC"] <= 1 and 0 <= mean["pixel_AUPRO"] <= 1
    image = next((workspace / "stages/download/sample/disc/test").rglob("*.png"))
    refused = stage("predict", str(image), "--trained", str(trained), "--out", str(tmp_path / "out"), "--category", "sample/disc",
                    cwd=workspace, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "scores a category's test images against each other (fewshot.mutual: true)" in refused.stderr


def test_batch_zero_shot_validation_never_scores_an_image_beside_its_own_synthetic_anomalies():
    """Scored together, a synthetic anomaly found its own source image (and its sibling) among the others: a near-twin
    no test image has, which pulled the validation maps, and the thresholds fitted on them, down. Each group now holds
    one version of every image of its category, real and synthetic mixed; the test split keeps one group."""
    from d2dprompt.core.data.latent_store import LatentRow
    from d2dprompt.pipeline.evaluate import twin_free_groups

    rows = []
    for category, images in (("disc", 3), ("tile", 4), ("weave", 1)):
        for i in range(images):
            path = f"{category}/train/good/{i:03d}.png"
            rows.append(LatentRow(path, "real", category, "val", 0, "good", path, ""))
            rows += [LatentRow(f"{path}#syn{k}", "synthetic", category, "val", 1, "perlin", path, "") for k in range(2)]
    groups = twin_free_groups(rows)
    members: dict[tuple[str, int], list[LatentRow]] = {}
    for row, group in zip(rows, groups):
        members.setdefault((row.category, group), []).append(row)
    for (category, _), held in members.items():
        sources = [row.image_path for row in held]
        if category == "weave":  # one image: nothing else to compare with, its versions stay together
            assert len(held) == 3
            continue
        assert len(sources) == len(set(sources)) >= 2  # one version of each image
    assert {len([g for (c, g) in members if c == category]) for category in ("disc", "tile")} == {3}
    assert all({r.source for r in held} == {"real", "synthetic"} for (c, _), held in members.items() if c == "tile")
    test = [LatentRow(f"disc/test/good/{i}.png", "real", "disc", "test", 0, "good", f"disc/test/good/{i}.png", "") for i in range(4)]
    assert twin_free_groups(test) == [0, 0, 0, 0]
