"""python -m d2dprompt.bench.profile_step [--arch sd21] [--batch 8] [--rows 32] [--threads 1] [--steps 3] [--cache resident|streamed] [--device auto]

One cached-query training step (attention.mode cached, joint prompts, the default loss) taken apart, part by part,
at the size of an architecture (`sd21`: SD-2.1-base's published configs with random weights, 512 px, levels 0-2;
speed does not depend on the weights). The parts, each timed on its own after warm-up steps (CUDA synchronised):

  load      the batch's cached queries to the device: a read from the safetensors file (streamed) or an index into
            the cache already on the device (resident), plus the host-to-device copy and the fp16 -> fp32 cast
  text      the text encoder's forward over the two learned prompts (the only network a cached step runs)
  attention `to_k` of every captured layer, the softmax against the cached queries and the map aggregation
  loss      focal + dice + image, against random blob masks
  backward  autograd through all of the above (text encoder and attention together)
  optimizer Adam's step on the prompt parameters

Then a torch.profiler table of one whole step (the 12 ops with the most self time) shows what dominates inside
them. The cache holds `--rows` copies of one image's queries (computed once by the real UNet), as many as a
category's training rows would be on disk: rows, not values, set the read cost.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import typer

from d2dprompt.core.runtime.cli import app_for

PARTS = ("load", "text", "attention", "loss", "backward", "optimizer")


def main(
    arch: str = typer.Option("sd21", help="tiny | sd21"),
    batch: int = typer.Option(8, min=1, help="training batch"),
    rows: int = typer.Option(32, min=1, help="rows in the query cache (a category's training rows)"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    steps: int = typer.Option(3, min=1, help="timed steps (after one warm-up step)"),
    cache: str = typer.Option("resident", help="resident (read whole onto the device) | streamed (rows read per batch, prefetched)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    from safetensors.torch import save_file

    from d2dprompt.bench.steps import ARCHS, arch_segmenter, blob_masks, describe_device
    from d2dprompt.core.models import pick_device
    from d2dprompt.core.runtime.config import LossParams
    from d2dprompt.core.runtime.timing import sync
    from d2dprompt.methods.d2dprompt.loss import total_loss
    from d2dprompt.methods.d2dprompt.model import fixed_noise
    from d2dprompt.methods.d2dprompt.query_cache import QueryCache

    if arch not in ARCHS or cache not in ("resident", "streamed"):
        raise typer.BadParameter(f"--arch {' | '.join(ARCHS)}, --cache resident | streamed; got {arch!r}, {cache!r}")
    torch.set_num_threads(threads)
    dev = pick_device(device)
    seg, side = arch_segmenter(arch, list(ARCHS[arch].levels), dev)
    sd = seg.sd
    latent = torch.randn(1, sd.unet.config.in_channels, side, side).to(dev)
    with torch.no_grad():  # one image through the real UNet: the cache's row shape
        one = {name: q.transpose(0, 1).half().cpu() for name, q in seg.compute_queries(latent, fixed_noise(1, tuple(latent.shape[1:]), 0).to(dev)).items()}
    seg.recorder.reset()
    tensors = {name: q.expand(rows, *q.shape[1:]).contiguous() for name, q in one.items()}
    per_row_mib = sum(q[0].numel() * 2 for q in tensors.values()) / 2**20
    folder = Path(tempfile.mkdtemp(prefix="profile-step-"))
    save_file(tensors, str(folder / "queries.safetensors"))
    del tensors
    stored = QueryCache(path=folder / "queries.safetensors")
    queries = stored.resident(dev) if cache == "resident" else stored
    masks, labels = (t.to(dev) for t in blob_masks(batch, side, 0))
    optimizer = torch.optim.Adam(seg.prompts.parameters(), lr=1e-3, betas=(0.5, 0.999))
    loss_params = LossParams()
    weights = {"focal": 1.0, "dice": 1.0, "image": 1.0}
    order = torch.randperm(rows)

    def step(times: dict[str, list[float]] | None) -> None:
        picked = order[torch.randint(0, rows - batch + 1, (1,)).item() :][:batch] if rows >= batch else order.repeat(batch)[:batch]
        marks = [time.perf_counter()]

        def mark() -> None:
            sync(dev)
            marks.append(time.perf_counter())

        q = queries.batch(picked, dev)
        mark()
        states = seg.prompt_states()
        mark()
        own = seg.prompt_states
        seg.prompt_states = lambda: states  # forward_cached's own text pass is the part timed above
        try:
            maps = {k: v.float() for k, v in seg.forward_cached(q, (side, side)).items()}
        finally:
            seg.prompt_states = own
        mark()
        loss, _ = total_loss(maps, masks, labels, weights, loss_params.focal_gamma, loss_params.image_top_percent)
        mark()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        optimizer.step()
        mark()
        if times is not None:
            for part, start, end in zip(PARTS, marks, marks[1:]):
                times[part].append((end - start) * 1000)

    if cache == "streamed":
        queries.prefetch([])  # reads on demand here: a profile of the read itself
    step(None)
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    for _ in range(steps):
        step(times)
    medians = {part: statistics.median(v) for part, v in times.items()}
    total = sum(medians.values())
    typer.echo(f"{arch}: {describe_device(dev)}, {threads} thread(s), batch {batch}, latents {side}x{side}, levels {list(ARCHS[arch].levels)}, "
               f"{len(seg.captured)} captured layers, query cache {cache} ({rows} rows x {per_row_mib:.1f} MiB)")
    typer.echo("| part | median ms | share |\n|---|---:|---:|")
    for part, ms in medians.items():
        typer.echo(f"| {part} | {ms:.1f} | {ms / total:.0%} |")
    typer.echo(f"| **step** | **{total:.1f}** | |")

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step(None)
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    typer.echo(prof.key_averages().table(sort_by=sort, row_limit=12))


if __name__ == "__main__":
    app_for(main, __doc__)()
