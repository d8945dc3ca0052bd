"""python -m d2dprompt.bench.fewshot [--arch sd21] [--shots 1,4] [--references 200] [--memory-mb 256] [--threads 1] [--device auto]

What few-shot D2D-Prompt costs at an architecture's size (`sd21`: SD-2.1-base's published configs with random weights,
512 px; speed and memory do not depend on the weights), per category and per test image:

  memory MiB   the fp32 memory of k reference images at the captured levels (params.yaml's attention.levels, [0, 1])
  unet ms      the one UNet pass that gives both the prompt map and the features (what zero-shot scoring costs too)
  knn ms       the nearest-neighbour distance map of one test image against that memory
And for a full-shot memory of `--references` images (a category's normal training images), its size, whether it fits
fewshot.memory_mb's default and the greedy coreset's time to bring it there.
"""

from __future__ import annotations

import time

import torch
import typer

from d2dprompt.core.runtime.cli import app_for


def main(
    arch: str = typer.Option("sd21", help="tiny | sd21"),
    shots: str = typer.Option("1,4", help="comma list of k"),
    references: int = typer.Option(200, min=1, help="full-shot: normal training images of a category (MVTec AD: 60 to 391)"),
    levels: str = typer.Option("0,1", help="attention levels (params.yaml's default)"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    repeats: int = typer.Option(3, min=1, help="timed repeats (after one warm-up)"),
    memory_mb: float = typer.Option(0.0, min=0, help="the budget per category; 0 = fewshot.memory_mb's default"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    from d2dprompt.bench.steps import ARCHS, arch_segmenter, describe_device
    from d2dprompt.core.models import pick_device
    from d2dprompt.core.runtime.config import FewshotParams
    from d2dprompt.core.runtime.timing import sync
    from d2dprompt.methods.d2dprompt.memory import maps_and_features
    from d2dprompt.methods.d2dprompt.model import fixed_noise
    from d2dprompt.methods.patch_memory import coreset, distance_map, rows_within

    torch.set_num_threads(threads)
    dev = pick_device(device)
    spec = ARCHS[arch]
    seg, side = arch_segmenter(arch, [int(v) for v in levels.split(",")], dev)
    seg.eval()
    latent = torch.randn(1, seg.sd.unet.config.in_channels, side, side, device=dev)
    noise = fixed_noise(1, tuple(latent.shape[1:]), 0).to(dev)

    def timed(fn) -> tuple[object, float]:
        out = fn()
        sync(dev)
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        sync(dev)
        return out, (time.perf_counter() - start) / repeats * 1000

    (_, features), unet_ms = timed(lambda: maps_and_features(seg, latent, noise))
    per_image = {name: f[0] for name, f in features.items()}
    image_mib = sum(f.numel() * 4 for f in per_image.values()) / 2**20
    print(f"{arch} at {spec.image_size} px, levels {levels}, {len(per_image)} captured layers, {describe_device(dev)}")
    print(f"features of one image: {image_mib:.1f} MiB fp32; UNet pass (prompt map + features): {unet_ms:.0f} ms")
    print("| k | memory MiB / category | kNN ms / image | UNet + kNN ms / image |")
    print("|---:|---:|---:|---:|")
    for k in (int(v) for v in shots.split(",")):
        memory = {name: (f + 0.01 * torch.randn(k, *f.shape, device=dev)).flatten(0, 1) for name, f in per_image.items()}  # k images' worth
        _, knn_ms = timed(lambda: distance_map(features, memory, seg.captured, (side, side)))
        print(f"| {k} | {k * image_mib:.0f} | {knn_ms:.0f} | {unet_ms + knn_ms:.0f} |")
    budget = memory_mb or FewshotParams().memory_mb
    full = references * image_mib
    print(f"full shot, {references} images: {full:.0f} MiB; fewshot.memory_mb {budget:g}: "
          + ("fits" if full <= budget else f"keeps a coreset of {budget / full:.1%} of the rows"))
    if full > budget:  # the coreset's cost on the largest layer, the one that dominates
        name, f = max(per_image.items(), key=lambda kv: kv[1].numel())
        rows = f.expand(references, *f.shape).reshape(-1, f.shape[-1])
        keep = rows_within(budget / full * rows.numel() * 4, f.shape[-1] * 4, len(rows))
        start = time.perf_counter()
        coreset(rows + 0.01 * torch.randn_like(rows), keep, 0)
        sync(dev)
        print(f"coreset of the largest layer ({len(rows)} rows -> {keep}): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app_for(main, __doc__)()
