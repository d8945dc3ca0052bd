"""python -m d2dprompt.bench.onnx [--arch tiny] [--threads 2] [--batch 1] [--images 8] [--device cpu]

Per-image latency and peak memory of D2D-Prompt's scoring, PyTorch against onnxruntime, at an architecture's size
with random weights (speed and memory do not depend on the weights; `sd21` is SD-2.1-base's published configs at
512 px). PyTorch runs the path predict takes for a trained folder (the method's encode + scorer: VAE encoder, text
encoder, the UNet up to the last captured layer, the maps); onnxruntime runs the graph python -m d2dprompt.export
writes for it (the text encoder's output baked in). Each backend runs in a process of its own, so its peak is that
process's whole resident peak (VmHWM): the PyTorch one holds the full SD as a trained folder loads it, the
onnxruntime one only the graph, and it never imports torch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from d2dprompt.core.runtime.cli import app_for

SEED = 0  # the random weights and the images: both processes rebuild the same model


def images_for(count: int, side: int) -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]


def build(arch: str, levels: list[int]):
    """(segmenter, record, scoring, side) of D2D-Prompt at `arch` with the pipeline's default blocks."""
    import torch

    from d2dprompt.bench.steps import ARCHS, arch_segmenter
    from d2dprompt.core.runtime.config import EvaluateParams, LossParams, ModelParams
    from d2dprompt.methods.base import Scoring

    segmenter, _ = arch_segmenter(arch, levels, torch.device("cpu"))
    record = {"method": "d2dprompt", "model": {"noise_seed": ModelParams().noise_seed}}
    return segmenter.eval(), record, Scoring.of(EvaluateParams(), LossParams(), ModelParams(precision="fp32")), ARCHS[arch].image_size


def time_batches(score, images: list[np.ndarray], batch: int) -> list[float]:
    """Milliseconds per image of each batch after one warm-up batch."""
    score(images[:batch])
    times = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        begin = time.perf_counter()
        score(chunk)
        times.append((time.perf_counter() - begin) * 1000 / len(chunk))
    return times


def worker(backend: str, arch: str, levels: list[int], graph: Path, side: int, threads: int, batch: int, count: int, device: str) -> dict:
    """One backend's figures, measured in this process."""
    if backend == "torch":
        import torch

        from d2dprompt.core.data.latent_store import LATENT_DTYPE
        from d2dprompt.core.models import encode
        from d2dprompt.methods.d2dprompt.model import latent_maps

        torch.set_num_threads(threads)
        segmenter, record, scoring, side = build(arch, levels)
        where = torch.device(device)
        segmenter.to(where)
        segmenter.sd.to(where)

        def score(chunk):
            with torch.no_grad():
                latents = encode(segmenter.sd, chunk, where).to(LATENT_DTYPE)
                return latent_maps(segmenter, latents, record["model"]["noise_seed"], scoring, where)
    else:
        from d2dprompt.serve.onnx_backend import INPUT, OUTPUTS, OnnxGraphs, providers_for, to_pixels

        session = OnnxGraphs.session_for(graph, providers_for(device), threads)

        def score(chunk):
            return session.run(list(OUTPUTS), {INPUT: to_pixels(chunk)})
    times = time_batches(score, images_for(count + batch, side), batch)
    return {"backend": backend, "ms_per_image": statistics.median(times), "peak_mib": peak_rss_mib(), "torch_loaded": "torch" in sys.modules}


def peak_rss_mib() -> float:
    """This process's resident peak (VmHWM): ru_maxrss would carry the forking parent's over exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: may include the parent's


def main(
    arch: str = typer.Option("tiny", help="tiny | sd21"),
    threads: int = typer.Option(2, min=1, help="CPU threads of each backend"),
    batch: int = typer.Option(1, min=1, help="images per forward"),
    images: int = typer.Option(8, min=1, help="timed images (after one warm-up batch)"),
    levels: str = typer.Option("0,1", help="attention levels (params.yaml's default)"),
    device: str = typer.Option("cpu", help="cpu | cuda (onnxruntime's CUDA provider, which onnxruntime-gpu has)"),
    run_worker: str = typer.Option("", "--worker", hidden=True),
    graph: Path = typer.Option(Path(""), hidden=True),
    side: int = typer.Option(0, hidden=True),
) -> None:
    chosen = [int(v) for v in levels.split(",")]
    if run_worker:
        typer.echo(json.dumps(worker(run_worker, arch, chosen, graph, side, threads, batch, images, device)))
        return
    from d2dprompt.export import export_graph_file
    from d2dprompt.methods.d2dprompt.graph import PromptGraph

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        segmenter, record, scoring, side = build(arch, chosen)
        begin = time.perf_counter()
        export_graph_file(PromptGraph(segmenter, record, scoring, None, side), side, path)
        exported_s = time.perf_counter() - begin
        del segmenter
        graph_mib = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        rows = []
        for backend in ("torch", "onnx"):
            args = [sys.executable, "-m", "d2dprompt.bench.onnx", "--worker", backend, "--graph", str(path), "--side", str(side), "--arch", arch,
                    "--threads", str(threads), "--batch", str(batch), "--images", str(images), "--levels", levels, "--device", device]
            proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if proc.returncode:
                raise SystemExit(f"{backend} worker failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    typer.echo(f"D2D-Prompt scoring at {arch} ({side} px, levels {levels}), {device}, {threads} thread(s), batch {batch}, "
               f"{images} timed images; graph {graph_mib:.1f} MiB, exported in {exported_s:.1f} s")
    typer.echo(f"{'backend':<12} {'ms/image':>10} {'peak MiB':>10}  torch imported")
    for row in rows:
        typer.echo(f"{row['backend']:<12} {row['ms_per_image']:>10.1f} {row['peak_mib']:>10.0f}  {row['torch_loaded']}")


app = app_for(main, __doc__)

if __name__ == "__main__":
    app()
