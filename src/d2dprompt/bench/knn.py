"""python -m d2dprompt.bench.knn [--memory 49152,196608,1228800] [--queries 4096] [--dim 36] [--threads 2]

What patchknn's and the few-shot memory's search costs as the memory grows (methods/patch_memory.py), each case in a
process of its own so that its peak resident memory (VmHWM, torch's import included) is its own:

  knn faiss    nearest_distances on the CPU: faiss's exact IndexFlatL2, one test image's cells (4096 at 256 px)
  knn blocks   closest_blocks, the GPU path, timed on the CPU: blocks of both the queries and the memory
  coreset      PatchCore's greedy k-center keeping 1 % of the rows (fewshot.memory_mb's coreset)
  mutual       MuSc's mutual scoring of `--images` images of one category (fewshot.mutual)

The defaults are patchknn at 256 px: 36 numbers per cell (4 latent channels x 3 x 3), 4096 cells per image, memories of
12, 48 and 300 images (a full-shot MVTec AD category). Random rows: the cost does not depend on the values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import typer

from d2dprompt.core.runtime.cli import app_for


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run_case(case: str, rows: int, queries: int, dim: int, images: int, threads: int) -> str:
    """One case in this process: '<seconds> <peak MiB>'."""
    import torch

    from d2dprompt.methods.patch_memory import closest_blocks, coreset, mutual_distances, nearest_distances

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    if case in ("faiss", "blocks"):
        memory, cells = torch.randn(rows, dim, generator=generator), torch.randn(queries, dim, generator=generator)
        start = time.perf_counter()
        nearest_distances(cells, memory) if case == "faiss" else closest_blocks(cells, memory, 4096, 16384)
    elif case == "coreset":
        memory = torch.randn(rows, dim, generator=generator)
        start = time.perf_counter()
        coreset(memory, max(1, rows // 100), 0)
    elif case == "mutual":
        cells = torch.randn(images, queries, dim, generator=generator)
        start = time.perf_counter()
        mutual_distances(cells, 0.3)
    else:
        raise typer.BadParameter(f"unknown case {case!r}")
    return f"{time.perf_counter() - start:.2f} {peak_rss_mib():.0f}"


def main(
    memory: str = typer.Option("49152,196608,1228800", help="memory rows: 12, 48 and 300 images of 4096 cells"),
    queries: int = typer.Option(4096, min=1, help="query rows: one image's cells at 256 px"),
    dim: int = typer.Option(36, min=1, help="numbers per row: patchknn's 4 latent channels x 3 x 3"),
    images: int = typer.Option(83, min=2, help="mutual: test images of one category (MVTec AD's mean is 115, its smallest 42)"),
    threads: int = typer.Option(2, min=1, help="torch and faiss CPU threads"),
    cases: str = typer.Option("faiss,blocks,coreset,mutual", help="comma list of faiss | blocks | coreset | mutual"),
    one: str = typer.Option("", hidden=True, help="run one case here: case:rows"),
) -> None:
    if one:
        case, rows = one.split(":")
        typer.echo(run_case(case, int(rows), queries, dim, images, threads))
        return
    typer.echo(f"{queries} queries of {dim} numbers, {threads} threads; mutual: {images} images of {queries} cells")
    typer.echo("| case | memory rows | seconds | peak RSS MiB |")
    typer.echo("|---|---:|---:|---:|")
    for case in cases.split(","):
        for rows in ([0] if case == "mutual" else [int(r) for r in memory.split(",")]):
            args = [sys.executable, "-m", "d2dprompt.bench.knn", "--one", f"{case}:{rows}", "--queries", str(queries),
                    "--dim", str(dim), "--images", str(images), "--threads", str(threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # faiss's OpenMP threads as torch's
            proc = subprocess.run(args, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{case} {rows}: failed\n{proc.stderr[-2000:]}")
            seconds, peak = proc.stdout.split()
            typer.echo(f"| {case} | {rows if rows else '-'} | {seconds} | {peak} |")


if __name__ == "__main__":
    app_for(main, __doc__)()
