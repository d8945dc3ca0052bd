"""python -m d2dprompt.bench.predict [--images 5000] [--side 512] [--trained stages/train/d2dprompt] [--workers 2] [--batch-size 8]

Peak memory and speed of `predict` on one folder of many images: writes `--images` generated `--side` px PNGs
(smooth texture plus sensor noise, each a function of its index) to a scratch folder, runs the predict CLI on
it in a subprocess and samples the memory of that process and its DataLoader workers every 0.1 s. Prints
images per second, the peak RSS of predict and the peak PSS of predict with its workers; run it at two folder sizes to see that memory
does not grow with the folder (BENCHMARKS.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer
from PIL import Image

from d2dprompt.core.runtime.cli import app_for

SAMPLE_EVERY_S = 0.1  # RSS sampling period: short next to one batch's time


def write_images(folder: Path, count: int, side: int) -> int:
    """`count` PNGs of `side` px; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        rng = np.random.default_rng(i)
        coarse = Image.fromarray(rng.integers(60, 200, (side // 32, side // 32, 3), dtype=np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(coarse, np.int16) + rng.integers(-6, 7, (side, side, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)  # fast to write; decoding cost is what is measured
        total += path.stat().st_size
    return total


def tree_memory(proc) -> tuple[int, int]:
    """(the process's own RSS, the PSS of it and all its children) in bytes. PSS splits pages shared between the
    forked DataLoader workers and their parent, so the sum is what the tree really holds; RSS would count them twice."""
    import psutil

    own, total = 0, 0
    for member in [proc, *proc.children(recursive=True)]:
        try:
            info = member.memory_full_info()
        except psutil.Error:
            continue  # a worker that just exited
        own = info.rss if member is proc else own
        total += info.pss
    return own, total


def main(
    images: int = typer.Option(5000, min=1, help="how many images the folder holds"),
    side: int = typer.Option(512, min=16, help="image side in pixels"),
    trained: Path = typer.Option(Path("stages/train/d2dprompt"), help="a train@<method> output"),
    workers: int = typer.Option(2, min=0, help="predict --workers"),
    batch_size: int = typer.Option(8, min=1, help="predict --batch-size"),
) -> None:
    import psutil

    scratch = Path(tempfile.mkdtemp(prefix="d2dprompt-bench-predict-"))
    try:
        started = time.perf_counter()
        size = write_images(scratch / "in", images, side)
        typer.echo(f"wrote {images} images of {side} px ({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s")
        cmd = [sys.executable, "-m", "d2dprompt.pipeline.predict", str(scratch / "in"), "--trained", str(trained), "--out", str(scratch / "out"),
               "--workers", str(workers), "--batch-size", str(batch_size)]
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc, peak_own, peak_tree = psutil.Process(child.pid), 0, 0
        while child.poll() is None:
            own, tree = tree_memory(proc)
            peak_own, peak_tree = max(peak_own, own), max(peak_tree, tree)
            time.sleep(SAMPLE_EVERY_S)
        elapsed = time.perf_counter() - started
        output = child.stdout.read()
        if child.returncode != 0:
            typer.echo(output[-3000:], err=True)
            raise typer.Exit(1)
        typer.echo(output.strip().splitlines()[-1])
        typer.echo(f"predict: {images} images of {side} px, workers {workers}, batch {batch_size}: {elapsed:.0f} s "
                   f"({images / elapsed:.1f} images/s); peak memory: predict {peak_own / 2**20:.0f} MiB RSS, "
                   f"predict + its workers {peak_tree / 2**20:.0f} MiB PSS")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
