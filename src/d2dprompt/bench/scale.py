"""python -m d2dprompt.bench.scale [--categories 1,4,15] [--methods d2dprompt,patchknn] [--fraction 1.0] [--epochs 1] [--out bench-scale]

What every stage costs at the size users bring. It generates an MVTec-AD-shaped folder (MVTEC_AD: the 15 categories
with MVTec AD's train / test counts, 700-1024 px originals, three of them greyscale, one synthetic defect per anomalous
image; generated, not downloaded), then, for each count of categories, runs in a fresh folder the commands dvc.yaml
gives the stages (folder@scale, latents, queries, train@<method>, evaluate@<method>-scale, compare@scale) on the first
that many categories, with the repository's params.yaml and the tiny model at `--image-size`. Per stage it records the
wall time, the peak resident memory of the stage's whole process tree (torchrun's workers included, sampled every
0.05 s) and the disk its outputs take; over the counts, the growth exponent b of cost ~ images^b (1: linear).

Training runs `--epochs` epochs (train.epochs, and <method>.epochs for a listed method that has its own): its time
is per `--epochs`, not a full training.
`--fraction` scales every category's image counts (at least 2 of each kind): a quick run of the same shape.
Writes <out>/scale.json and prints the table BENCHMARKS.md shows.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import typer
import yaml

from d2dprompt.core.runtime.cli import app_for

# name, normal training images, normal test images, anomalous test images, side (px), greyscale: MVTec AD's
# 3,629 training and 1,725 test images (467 normal, 1,258 anomalous)
MVTEC_AD = (
    ("bottle", 209, 20, 63, 900, False), ("cable", 224, 58, 92, 1024, False), ("capsule", 219, 23, 109, 1000, False),
    ("carpet", 280, 28, 89, 1024, False), ("grid", 264, 21, 57, 1024, True), ("hazelnut", 391, 40, 70, 1024, False),
    ("leather", 245, 32, 92, 1024, False), ("metal_nut", 220, 22, 93, 700, False), ("pill", 267, 26, 141, 800, False),
    ("screw", 320, 41, 119, 1024, True), ("tile", 230, 33, 84, 840, False), ("toothbrush", 60, 12, 30, 1024, False),
    ("transistor", 213, 60, 40, 1024, False), ("wood", 247, 19, 60, 1024, False), ("zipper", 240, 32, 119, 1024, True),
)
DATASET = "scale"  # the generated folder's name in download.folders
TEXTURE = 24  # side of the random texture each image is upscaled from: smooth, so the PNGs stay small
SAMPLE_S = 0.05  # how often a stage's process tree is sampled for its resident memory
MIB = 2**20


def counts(fraction: float) -> list[tuple[str, int, int, int, int, bool]]:
    """MVTEC_AD with every image count scaled by `fraction` (at least 2 of each kind)."""
    return [(name, max(2, round(train * fraction)), max(2, round(good * fraction)), max(2, round(bad * fraction)), side, grey)
            for name, train, good, bad, side, grey in MVTEC_AD]


def picture(rng: np.random.Generator, side: int, grey: bool) -> np.ndarray:
    from PIL import Image

    texture = rng.integers(40, 216, (TEXTURE, TEXTURE) if grey else (TEXTURE, TEXTURE, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(texture).resize((side, side), Image.Resampling.BILINEAR))


def defect(rng: np.random.Generator, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`pixels` with one elliptic blot of another shade, and its 0/255 mask."""
    side = pixels.shape[0]
    cy, cx = rng.integers(side // 8, side - side // 8, 2)
    ry, rx = rng.integers(side // 40, side // 10, 2)
    y, x = np.ogrid[:side, :side]
    mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    out = pixels.copy()
    out[mask] = 255 - out[mask]
    return out, (mask * 255).astype(np.uint8)


def generate(root: Path, fraction: float) -> int:
    """The MVTec-layout folder under `root` (kept when it is there with the same fraction); its image count."""
    from PIL import Image
    from tqdm import tqdm

    stamp = root / "generated.json"
    plan = counts(fraction)
    total = sum(train + good + bad for _, train, good, bad, _, _ in plan)
    if stamp.is_file() and json.loads(stamp.read_text()) == {"fraction": fraction, "images": total}:
        return total
    shutil.rmtree(root, ignore_errors=True)
    with tqdm(total=total, desc="generate", unit=" images") as bar:
        for index, (name, train, good, bad, side, grey) in enumerate(plan):
            rng = np.random.default_rng([index, side])
            for folder, n in (("train/good", train), ("test/good", good), ("test/damage", bad)):
                (root / name / folder).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    pixels = picture(rng, side, grey)
                    if folder == "test/damage":
                        pixels, mask = defect(rng, pixels)
                        (root / name / "ground_truth/damage").mkdir(parents=True, exist_ok=True)
                        Image.fromarray(mask).save(root / name / f"ground_truth/damage/{i:03d}_mask.png")
                    Image.fromarray(pixels).save(root / name / f"{folder}/{i:03d}.png", compress_level=1)
                    bar.update()
    stamp.write_text(json.dumps({"fraction": fraction, "images": total}))
    return total


def render(text: str, values: dict[str, str]) -> str:
    """dvc.yaml's `${...}` with `values`; one it does not know stops the benchmark (dvc.yaml changed shape)."""
    def one(match: re.Match) -> str:
        if match.group(1) not in values:
            raise typer.BadParameter(f"dvc.yaml: ${{{match.group(1)}}} has no value in bench.scale")
        return values[match.group(1)]

    return re.sub(r"\$\{([^}]+)\}", one, " ".join(text.split()))


def stage_commands(dvc_yaml: dict, methods: list[str], data: Path, nproc: int, dataset: str = DATASET) -> list[tuple[str, str, list[str]]]:
    """(name, command, outputs) of the stages a run on the folder `data` named `dataset` goes through, from dvc.yaml."""
    stages = dvc_yaml["stages"]
    common = {"distributed.nproc": str(nproc)}

    def of(stage: str, name: str, **values: str) -> tuple[str, str, list[str]]:
        body = stages[stage].get("do", stages[stage])  # foreach stages keep theirs under `do`, matrix stages do not
        rendered = {**common, **values}
        written = [o for key in ("outs", "metrics", "plots") for o in body.get(key, [])]
        outs = [render(next(iter(o)) if isinstance(o, dict) else o, rendered) for o in written]
        return name, render(body["cmd"], rendered), outs

    planned = [of("folder", f"folder@{dataset}", key=dataset, item=str(data)), of("latents", "latents"), of("queries", "queries")]
    planned += [of("train", f"train@{m}", item=m) for m in methods]
    planned += [of("evaluate", f"evaluate@{m}-{dataset}", **{"item.method": m, "item.dataset": dataset}) for m in methods]
    planned.append(of("compare", f"compare@{dataset}", item=dataset))
    return planned


def run_measured(command: str, cwd: Path, log: Path) -> tuple[float, float]:
    """Run `command` in `cwd` (output to `log`): (seconds, peak resident MiB of its process tree)."""
    import psutil

    start, peak = time.perf_counter(), 0
    with log.open("w") as out:
        # `python` and `torchrun` as dvc would find them, from this interpreter's environment first
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        # a session of its own: stopping the benchmark (Ctrl+C) stops the stage and torchrun's workers with it
        proc = subprocess.Popen(command, shell=True, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        watched = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                rss = 0
                for p in [watched, *watched.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:  # ended between the listing and the reading
                        pass
                peak = max(peak, rss)
                time.sleep(SAMPLE_S)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    if proc.returncode:
        raise RuntimeError(f"{command}: exit code {proc.returncode}; its output is in {log}")
    return time.perf_counter() - start, peak / MIB


def disk_mib(paths: list[Path]) -> float:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*") if p.is_dir() else []) if f.is_file()]
    return sum(f.stat().st_size for f in files) / MIB


def params_for(base: dict, data: Path, categories: list[str], methods: list[str], image_size: int, epochs: int) -> dict:
    params = json.loads(json.dumps(base))
    params["methods"] = methods
    params["download"].update(folders={DATASET: str(data)}, categories=categories)
    params["model"]["image_size"] = image_size
    for block in ("train", "evaluate"):
        params[block]["datasets"] = [DATASET]
    params["train"]["epochs"] = epochs
    for method in methods:  # a method that trains for its own epochs has them in its block (<method>.epochs)
        if "epochs" in params.get(method, {}):
            params[method]["epochs"] = epochs
    return params


def exponent(images: list[int], values: list[float]) -> float:
    """b of value ~ images^b, least squares in log-log; nan with fewer than two sizes."""
    if len(set(images)) < 2 or min(values) <= 0:
        return math.nan
    return float(np.polyfit(np.log(images), np.log(values), 1)[0])


def table(rows: list[dict]) -> str:
    sizes = sorted({(r["categories"], r["images"]) for r in rows})
    head = " | ".join(f"{c} cat. ({n} img) s / MiB / disk MiB" for c, n in sizes)
    lines = [f"| stage | {head} | exponent time / RSS |", "|---|" + "---:|" * (len(sizes) + 1)]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = {r["categories"]: r for r in rows if r["stage"] == stage}
        cells = [f"{mine[c]['seconds']:.1f} / {mine[c]['peak_rss_mib']:.0f} / {mine[c]['disk_mib']:.1f}" if c in mine else "–" for c, _ in sizes]
        known = [mine[c] for c, _ in sizes if c in mine]
        grow = (exponent([r["images"] for r in known], [r["seconds"] for r in known]),
                exponent([r["images"] for r in known], [r["peak_rss_mib"] for r in known]))
        lines.append(f"| {stage} | " + " | ".join(cells) + " | " + " / ".join("–" if math.isnan(g) else f"{g:.2f}" for g in grow) + " |")
    return "\n".join(lines)


def main(
    categories: str = typer.Option("1,4,15", help="counts of categories to run, each a fresh run on the first that many"),
    methods: str = typer.Option("d2dprompt,patchknn", help="methods of the registry, comma-separated"),
    fraction: float = typer.Option(1.0, min=0.0, help="scale every category's image counts (1 = MVTec AD's)"),
    image_size: int = typer.Option(256, help="model.image_size"),
    epochs: int = typer.Option(1, min=1, help="training epochs per method (timed per this many)"),
    nproc: int = typer.Option(1, min=1, help="distributed.nproc: processes torchrun starts"),
    out: Path = typer.Option(Path("bench-scale"), help="generated data, one work folder per count, scale.json"),
    repo: Path = typer.Option(Path("."), help="the repository: its dvc.yaml and params.yaml"),
) -> None:
    steps = sorted({int(c) for c in categories.split(",")})
    if not steps or steps[0] < 1 or steps[-1] > len(MVTEC_AD):
        raise typer.BadParameter(f"--categories: counts between 1 and {len(MVTEC_AD)}, got {categories}")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    base = yaml.safe_load((repo / "params.yaml").read_text())
    data = (out / "data").resolve()
    generate(data, fraction)
    plan = counts(fraction)
    rows = []
    for step in steps:
        chosen = [name for name, *_ in plan[:step]]
        images = sum(train + good + bad for _, train, good, bad, _, _ in plan[:step])
        work = (out / f"work-{step}").resolve()
        shutil.rmtree(work, ignore_errors=True)
        (work / "logs").mkdir(parents=True)
        params = params_for(base, data, chosen, names, image_size, epochs)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage, command, outs in stage_commands(dvc_yaml, names, data, nproc):
            if stage.startswith("compare") and len(names) < 2:
                continue
            try:
                seconds, peak = run_measured(command, work, work / "logs" / f"{stage.replace('@', '_')}.log")
            except RuntimeError as err:
                typer.echo(f"error: {stage}: {err}", err=True)
                raise typer.Exit(1) from None
            row = {"categories": step, "images": images, "stage": stage, "seconds": round(seconds, 2),
                   "peak_rss_mib": round(peak, 1), "disk_mib": round(disk_mib([work / o for o in outs]), 1)}
            rows.append(row)
            typer.echo(f"{step:>2} categories ({images} images) {stage}: {seconds:.1f} s, peak {peak:.0f} MiB, {row['disk_mib']:.0f} MiB written")
        (out / "scale.json").write_text(json.dumps({"fraction": fraction, "image_size": image_size, "epochs": epochs,
                                                    "methods": names, "rows": rows}, indent=2))
    typer.echo(table(rows))


if __name__ == "__main__":
    app_for(main, __doc__)()
