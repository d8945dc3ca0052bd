"""python -m d2dprompt.export: every method's trained tiny model exported to ONNX scores the sample's test images as
PyTorch does (maps within 1e-4, the same decisions at the fitted thresholds), and the exported folder is scored by
predict, the Python API and the web app on a machine with neither torch nor DVC (tests/no_torch.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import METHODS, ROOT, run_cmd
from tests.no_torch import ABSENT

pytestmark = pytest.mark.e2e
TOLERANCE = 1e-4  # the bound on |map difference| for maps in [0, 1] computed in fp32
# the two that read the stored fp16 latents as values: a latent rounding the other way moves their maps (base.py)
ROUNDING_BOUND = {"patchknn": 1e-2, "decodiff": 1e-3}
FEW_SHOT_BOUND = 1e-2  # few-shot D2D-Prompt's fused maps: z-scores of feature distances (methods/d2dprompt)
NO_TORCH = str(ROOT / "tests" / "no_torch.py")


@pytest.fixture(scope="session")
def exported(every_method, tmp_path_factory) -> Path:
    """`python -m d2dprompt.export` of each method of the six-method run, as the README shows it."""
    out = tmp_path_factory.mktemp("exported")
    for method in METHODS:
        run_cmd(["python", "-m", "d2dprompt.export", f"stages/train/{method}", "--format", "onnx", "--out", str(out / method)], every_method)
    return out


def sample_test_images(repo: Path, category: str | None) -> list[Path]:
    """The sample's test images of one category ('sample/<name>'), or of all when the run has no categories."""
    pattern = f"{category.split('/')[1]}/test/*/*.png" if category else "*/test/*/*.png"
    return sorted((repo / "stages/download/sample").glob(pattern))


def first_category(folder: Path) -> str | None:
    """A run with a model, class label or memory per category loads as one of them; None for the others."""
    return (json.loads((folder / "model.json").read_text()).get("categories") or [None])[0]


def compare(torch_detector, onnx_detector, images: list[Path], bound: float) -> dict:
    """Maps, scores and decisions of both backends on `images`, batch by batch as predict scores them. A score
    difference within `bound` may flip the decision of an image that close to the threshold: those count apart."""
    ours, theirs = torch_detector.predict_batch(images), onnx_detector.predict_batch(images)
    threshold = torch_detector.thresholds.image
    flipped = [a.label != b.label for a, b in zip(ours, theirs)]
    near = [abs(a.score - threshold) <= bound for a in ours]
    return {
        "map": max(float(np.abs(a.map - b.map).max()) for a, b in zip(ours, theirs)),
        "score": max(abs(a.score - b.score) for a, b in zip(ours, theirs)),
        "flips": sum(flipped), "flips_away": sum(f and not n for f, n in zip(flipped, near)), "near": sum(near), "images": len(ours),
    }


@pytest.mark.parametrize("method", METHODS)
def test_an_exported_method_scores_the_sample_as_pytorch_does(every_method, exported, method):
    from d2dprompt.serve.detector import Detector

    first = first_category(exported / method)
    torch_detector = Detector.load(every_method / f"stages/train/{method}", thresholds=every_method / f"stages/evaluate/{method}/sample/thresholds.json",
                                   device="cpu", category=first)
    onnx_detector = Detector.load(exported / method, backend="onnx", device="cpu", category=first)
    assert onnx_detector.exported and not torch_detector.exported
    assert (onnx_detector.thresholds.image, onnx_detector.thresholds.pixel) == (torch_detector.thresholds.image, torch_detector.thresholds.pixel)
    bound = ROUNDING_BOUND.get(method, TOLERANCE)
    assert torch_detector.method_object.export_tolerance(torch_detector.record) == bound
    manifest = json.loads((exported / method / "manifest.json").read_text())
    assert manifest["parity"]["tolerance"] == bound
    for check in manifest["parity"]["checks"]:  # export's own check ran on the run's real test images, not only synthetic ones
        assert check["real_images"] == min(8, len(sample_test_images(every_method, check["category"]))) > 0, check
    assert [g["category"] for g in manifest["graphs"]] == (torch_detector.categories or [None])
    for category in torch_detector.categories or [None]:
        found = compare(torch_detector.for_category(category), onnx_detector.for_category(category), sample_test_images(every_method, category), bound)
        print(f"{method} {category}: max |map difference| {found['map']:.2e}, max |score difference| {found['score']:.2e}, "
              f"{found['flips']} decisions differ, {found['near']} of {found['images']} images within {bound:g} of the threshold")
        assert found["map"] <= bound and found["score"] <= bound and found["flips_away"] == 0, (category, found)


@pytest.mark.parametrize("method", ["d2dprompt", "patchknn"])
def test_a_few_shot_run_exports_its_memory_per_category(few_shot, tmp_path, method):
    from d2dprompt.serve.detector import Detector

    run_cmd(["python", "-m", "d2dprompt.export", f"stages/train/{method}", "--out", str(tmp_path / method)], few_shot)
    first = first_category(tmp_path / method)
    torch_detector = Detector.load(few_shot / f"stages/train/{method}", thresholds=few_shot / f"stages/evaluate/{method}/sample/thresholds.json",
                                   device="cpu", category=first)
    onnx_detector = Detector.load(tmp_path / method, device="cpu", category=first)
    assert onnx_detector.categories == torch_detector.categories and len(onnx_detector.categories) == 3
    for category in onnx_detector.categories:
        bound = FEW_SHOT_BOUND if method == "d2dprompt" else ROUNDING_BOUND[method]
        found = compare(torch_detector.for_category(category), onnx_detector.for_category(category), sample_test_images(few_shot, category), bound)
        print(f"few-shot {method} {category}: max |map difference| {found['map']:.2e}, max |score difference| {found['score']:.2e}")
        assert found["map"] <= bound and found["score"] <= bound and found["flips_away"] == 0, (category, found)


def test_predict_the_api_and_the_app_score_an_export_without_torch(every_method, exported, tmp_path):
    """tests/no_torch.py makes torch, diffusers, DVC and MLflow unimportable, as with only the onnx extra installed."""
    image = sample_test_images(every_method, None)[-1]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, NO_TORCH, "d2dprompt.pipeline.predict", str(image.parent), "--trained", str(exported / "d2dprompt"),
                           "--out", str(out), "--backend", "onnx", "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {Path(r["image"]).name: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert "thresholds.json" in records[image.name]["threshold_source"]  # the exported folder's own thresholds

    from d2dprompt.serve.detector import Detector

    expected = Detector.load(every_method / "stages/train/d2dprompt", thresholds=exported / "d2dprompt/thresholds.json", device="cpu").predict(image)
    assert abs(records[image.name]["score"] - expected.score) <= TOLERANCE and records[image.name]["label"] == expected.label

    script = tmp_path / "api.py"
    script.write_text("import json, sys\nfrom d2dprompt import Detector\n"
                      "result = Detector.load(sys.argv[1]).predict(sys.argv[2])\n"
                      "assert 'torch' not in sys.modules\nprint(json.dumps([result.score, result.label, list(result.mask.shape)]))\n")
    proc = subprocess.run([sys.executable, NO_TORCH, str(script), str(exported / "d2dprompt"), str(image)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    score, label, shape = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(score - expected.score) <= TOLERANCE and label == expected.label and shape == list(expected.mask.shape)

    from gradio_client import Client, handle_file

    from tests.test_app import running_app

    with running_app(tmp_path, "--runs", str(exported / "d2dprompt"), python=(NO_TORCH,)) as (url, _):
        answer = Client(url, verbose=False, download_files=str(tmp_path / "downloads")).predict(
            "d2dprompt", None, [handle_file(str(image))], [], 0.5, 0.5, api_name="/detect")
    (shown,) = json.loads(Path(answer[-1]).read_text())["images"]
    assert abs(shown["score"] - expected.score) <= TOLERANCE and shown["label"] == expected.label


def test_the_base_install_and_the_onnx_extra_hold_nothing_tests_no_torch_hides():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deploy = [*project["dependencies"], *project["optional-dependencies"]["onnx"]]
    names = {d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower().replace("-", "_") for d in deploy}
    assert not names & {name.lower() for name in ABSENT}, names & set(ABSENT)
    assert "onnxruntime" in names


def test_an_altered_graph_is_refused_before_it_runs(exported, tmp_path):
    from d2dprompt.serve.detector import Detector
    from d2dprompt.serve.onnx_backend import ExportedError

    copy = shutil.copytree(exported / "d2dprompt", tmp_path / "copy")
    graph = copy / "graphs/0/model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ExportedError, match=r"graphs/0/model.onnx: sha256 differs"):
        Detector.load(copy)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _swap_categories(manifest: dict) -> None:
    first, second = manifest["graphs"][0], manifest["graphs"][1]
    first["category"], second["category"] = second["category"], first["category"]


TAMPERING = {  # what was accepted (rc 0, another graph or file in use) or a long traceback before
    "a graph file outside the folder": ("manifest.json", lambda m: m["graphs"][0].update(graph="../../../outside.onnx"),
                                        r"graphs\[0\] must be the graph of sample/\w+ in graphs/0/"),
    "a graph folder outside the folder": ("manifest.json", lambda m: m["graphs"][0].update(folder="../.."), r"graphs\[0\] must be the graph"),
    "two categories swapped": ("manifest.json", _swap_categories, r"graphs\[0\] must be the graph of sample/"),
    "a file name with a path": ("manifest.json", lambda m: m["files"].update({"../model.json": "0" * 64}), r"'\.\./model\.json' is not a file name inside"),
    "no evaluate block": ("manifest.json", lambda m: m.pop("evaluate"), r"manifest\.json: 'evaluate' must be a JSON object"),
    "altered thresholds": ("thresholds.json", lambda t: t.update(image=-5.0), r"thresholds\.json: sha256 differs"),
    "altered record": ("model.json", lambda r: r.update(categories=list(reversed(r["categories"]))), r"model\.json: sha256 differs"),
    "altered input side": ("preprocessing.json", lambda p: p.update(side=64), r"preprocessing\.json: sha256 differs"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_an_exported_folder_is_checked_against_its_manifest_before_it_runs(exported, tmp_path, case):
    """draem's export (one graph per category): every file named, hashed and inside the folder, graph i bound to
    category i, the manifest's keys present; each edit is refused in one line before a session opens."""
    from d2dprompt.serve.detector import Detector
    from d2dprompt.serve.onnx_backend import ExportedError

    copy = shutil.copytree(exported / "draem", tmp_path / "copy")
    name, change, said = TAMPERING[case]
    _edit_json(copy / name, change)
    with pytest.raises(ExportedError, match=said) as info:
        Detector.load(copy, category="sample/disc")
    assert "\n" not in str(info.value)


def test_each_backend_refuses_the_other_folder_and_baked_settings_hold(every_method, exported, tmp_path):
    from d2dprompt.core.runtime.config import ParamsError
    from d2dprompt.serve.detector import Detector

    with pytest.raises(ValueError, match="export it first: python -m d2dprompt.export"):
        Detector.load(every_method / "stages/train/d2dprompt", backend="onnx")
    with pytest.raises(ValueError, match="an exported folder"):
        Detector.load(exported / "d2dprompt", backend="torch")
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  sigma: 1.0\n")
    with pytest.raises(ParamsError, match=r"evaluate.sigma=4.0, the params file says 1.0"):
        Detector.load(exported / "d2dprompt", params=params)


def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_nothing(every_method, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "d2dprompt.export", "stages/train/d2dprompt", "--out", str(tmp_path / "strict"), "--tolerance", "0"],
                          cwd=every_method, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "differs from PyTorch" in proc.stderr and "not exported" in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_the_parity_check_takes_real_test_images_spread_over_the_category_and_none_without_a_download(tmp_path):
    from PIL import Image

    from d2dprompt.export import real_images

    for defect, count in (("good", 5), ("crack", 7)):
        folder = tmp_path / "sample/disc/test" / defect
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(folder / f"{i:03d}.png")
    found = real_images(tmp_path, "sample/disc", side=16)
    assert len(found) == 8 and all(image.shape == (16, 16, 3) for image in found)
    assert {int(image[0, 0, 0]) for image in found} >= {0, 80, 120}  # both defect folders: first, last and between
    assert len(real_images(tmp_path, None, side=16)) == 8 and real_images(tmp_path / "absent", "sample/disc", side=16) == []
