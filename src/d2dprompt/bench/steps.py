"""python -m d2dprompt.bench.steps [--arch tiny,sd21] [--batch N] [--steps N] [--warmup N] [--device auto|cpu|cuda] [--json PATH]

Speed and memory of the training and inference paths, in one process, per architecture:
- train:   forward + loss (focal + dice + image, weights 1) against random blob masks + backward + Adam
           step on the prompt parameters. `full` runs the frozen UNet every step; `cached` reads queries
           computed once per image (the `queries` rows time that one-off pass) and runs only the text
           encoder, `to_k` and the softmax.
- infer:   no_grad, a batch of latents -> anomaly maps through the real UNet, early exit on, and once
           off (joint layout when measured) to show what stopping after the last captured layer saves.
`sd21` is the SD-2.1-base architecture (its published configs) with random weights: speed and memory do
not depend on the weights. Latents are random, of the size the VAE makes from `--image-size` pixels.
Per row: median step time of the timed steps, images/s, peak memory beyond the frozen weights (CUDA:
max_memory_allocated minus the weights' bytes; CPU: peak RSS sampled during the row minus RSS at its
start) and the ratio to the same architecture's `full + paired` row of the same kind (queries: training).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import typer
from tqdm import tqdm

from d2dprompt.methods.d2dprompt.attention import cross_attention_levels
from d2dprompt.core.runtime.config import AttentionParams, LossParams, ModelParams, PromptParams
from d2dprompt.methods.d2dprompt.loss import total_loss
from d2dprompt.core.models import (
    FrozenSD,
    autocast,
    build_sd21_architecture,
    build_tiny,
    pick_device,
)
from d2dprompt.core.runtime.outputs import write_json
from d2dprompt.core.runtime.timing import sync, timed
from d2dprompt.methods.d2dprompt.query_cache import QueryCache
from d2dprompt.methods.d2dprompt.model import D2DSegmenter, build_segmenter, fixed_noise

MIB = 2**20
LOSS_WEIGHTS = {"focal": 1.0, "dice": 1.0, "image": 1.0}  # the default loss block: the terms every run pays for
LOSS = LossParams()  # focal_gamma and image_top_percent as a default run
CACHED_SPEEDUP_TARGET = 20.0  # cached training vs full + paired at the same batch (sd21)
CACHED_MEMORY_TARGET_GB = 3.0  # cached training at batch 8, mixed precision, beyond the frozen weights
INFER_MS_TARGET = 20.0  # per image on an H100: the fast end of CLIP-based zero-shot detectors (16-155 ms)


@dataclass(frozen=True)
class Arch:
    build: Callable[[int], FrozenSD]
    image_size: int  # the pixels its VAE is made for
    levels: tuple[int, ...]  # attention levels read by default
    cpu_batch: int
    cpu_schedule: tuple[int, int, int, int]  # (warm-up, steps) of UNet rows, then of cached training rows


ARCHS = {
    "tiny": Arch(build_tiny, 128, (0, 1), 8, (1, 2, 1, 3)),  # ModelParams / AttentionParams defaults
    # a full sd21 step takes 10-70 s per image on 2 shared cores: batch 1 and one timed step keep the
    # whole default CPU run under 10 minutes even while other jobs load the machine
    "sd21": Arch(build_sd21_architecture, 512, (0, 1, 2), 1, (1, 1, 1, 2)),
}
GPU_SCHEDULE = (3, 10, 3, 10)


def arch_segmenter(arch: str, levels: list[int], device: torch.device, prompts: str = "joint"):
    """(a D2D-Prompt segmenter reading `levels` of the architecture's SD with random weights, on `device`, its latent
    side): what the benchmarks that time one part of D2D-Prompt start from."""
    from d2dprompt.core.runtime.config import AttentionParams, ModelParams, PromptParams
    from d2dprompt.methods.d2dprompt.model import build_segmenter

    spec = ARCHS[arch]
    sd = spec.build(0)
    torch.manual_seed(0)
    seg = build_segmenter(sd, PromptParams(), AttentionParams(levels=levels, prompts=prompts), ModelParams(image_size=spec.image_size)).to(device)
    return seg, spec.image_size // sd.vae_scale
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # fp16 too: a speed measurement needs no gradient scaler


@dataclass
class Row:
    arch: str
    kind: str  # train | queries | infer
    mode: str  # full | cached
    prompts: str  # paired | joint
    early_exit: bool
    batch: int
    step_ms: float  # median of the timed steps
    images_per_s: float
    peak_mib: float  # beyond the frozen weights (see the module docstring)
    times_ms: list[float] = field(default_factory=list)  # the timed steps
    warmup_ms: list[float] = field(default_factory=list)  # the untimed ones: first-call set-up shows here
    ratio: float | None = None  # step_ms / the same arch's full + paired step_ms of the same kind

    @property
    def label(self) -> str:
        return f"{self.kind} {self.mode}+{self.prompts}" + ("" if self.early_exit else ", no early exit")


def release_memory(device: torch.device) -> None:
    """Hand freed memory back, so that a row's peak is measured from what is really resident."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc otherwise keeps freed arenas in the RSS
        except OSError:
            pass


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak minus `weights_bytes`, or CPU RSS growth.

    CPU: RSS sampled every `interval_s` by psutil; without psutil, the growth of the process's peak RSS
    (getrusage), which reads 0 for a block that stays under an earlier peak.
    """

    def __init__(self, device: torch.device, weights_bytes: int, interval_s: float = 0.005):
        self.device, self.weights_bytes, self.interval_s = device, weights_bytes, interval_s
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        release_memory(self.device)
        if self.device.type == "cuda":
            return self
        try:
            import psutil

            self._rss = psutil.Process().memory_info
        except ImportError:
            self._rss = None
        self._start = self._max = self._rss().rss if self._rss else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self._rss:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._rss().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.weights_bytes
        elif self._rss:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._max, self._rss().rss) - self._start
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start


def blob_masks(batch: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random disk per anomalous image (every other image; the rest are normal): masks, labels."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    labels = (torch.arange(batch) % 2 == 0).float()
    masks = torch.zeros(batch, side, side)
    for i in range(0, batch, 2):
        cy, cx = torch.rand(2, generator=gen) * side
        radius = side * (0.05 + 0.15 * torch.rand(1, generator=gen))
        masks[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).float()
    return masks, labels


@dataclass
class Settings:
    batch: int
    schedule: tuple[int, int, int, int]  # (warm-up, steps) of UNet rows, then of cached training rows
    image_size: int
    levels: list[int]
    modes: list[str]  # training modes; empty = inference rows only
    prompts: list[str]
    precision: str
    infer: bool = True
    seed: int = 0

    @property
    def exit_layout(self) -> str:
        """The layout also run without early exit: joint, the cheaper one, when it is measured."""
        return "joint" if "joint" in self.prompts else self.prompts[0]


def bench_arch(name: str, sd: FrozenSD, cfg: Settings, device: torch.device) -> tuple[list[Row], dict]:
    """Every row of one architecture, and facts about it (weights, query cache per image, exit point)."""
    weights = sum(t.numel() * t.element_size() for m in (sd.text_encoder, sd.unet, sd.vae) for t in [*m.parameters(), *m.buffers()])
    side = cfg.image_size // sd.vae_scale
    gen = torch.Generator().manual_seed(cfg.seed)
    latents = torch.randn(cfg.batch, sd.unet.config.in_channels, side, side, generator=gen).to(device)
    noise = fixed_noise(cfg.batch, tuple(latents.shape[1:]), cfg.seed).to(device)
    masks, labels = (t.to(device) for t in blob_masks(cfg.batch, side, cfg.seed))
    level_of = cross_attention_levels(sd.unet)
    layers = list(level_of)
    read = [i for i, layer in enumerate(layers) if level_of[layer] in cfg.levels]
    info = {"weights_mib": weights / MIB, "latent_side": side, "levels": cfg.levels, "exit_layout": cfg.exit_layout,
            "query_cache_mib_per_image": {}}
    if read:  # unknown levels are named by build_segmenter
        info["early_exit_after"] = f"{layers[read[-1]].removesuffix('.processor')} (cross-attention layer {read[-1] + 1} of {len(layers)})"
    rows: list[Row] = []

    def measure(kind: str, mode: str, prompts: str, step: Callable[[], None], early_exit: bool = True) -> None:
        warmup, steps = cfg.schedule[2:] if (kind, mode) == ("train", "cached") else cfg.schedule[:2]
        row = Row(name, kind, mode, prompts, early_exit, cfg.batch, 0.0, 0.0, 0.0)
        with PeakMemory(device, weights) as mem:
            row.warmup_ms, row.times_ms = timed(step, warmup, steps, device, f"{name} {row.label}")
        row.step_ms = statistics.median(row.times_ms)
        row.images_per_s, row.peak_mib = cfg.batch * 1000 / row.step_ms, mem.peak_bytes / MIB
        rows.append(row)
        tqdm.write(f"  {name:5s} {row.label:36s} {row.step_ms:10.1f} ms  {row.peak_mib:9.1f} MiB")

    def segmenter(prompts: str, early_exit: bool = True) -> D2DSegmenter:
        torch.manual_seed(cfg.seed)  # the same initial prompts for every row
        attention = AttentionParams(levels=cfg.levels, prompts=prompts)
        return build_segmenter(sd, PromptParams(), attention, ModelParams(), early_exit).to(device)

    def infer_step(seg: D2DSegmenter) -> None:
        with torch.no_grad(), autocast(device, cfg.precision):
            seg(latents, noise)["anomaly"].float()

    def train_rows(prompts: str, seg: D2DSegmenter) -> None:
        optimizer = torch.optim.Adam(seg.prompts.parameters(), lr=1e-3, betas=(0.5, 0.999))

        def train_step(forward: Callable[[], dict]) -> None:
            with autocast(device, cfg.precision):
                maps = forward()
            loss, _ = total_loss({k: v.float() for k, v in maps.items()}, masks, labels, LOSS_WEIGHTS, LOSS.focal_gamma, LOSS.image_top_percent)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        if "full" in cfg.modes:
            measure("train", "full", prompts, lambda: train_step(lambda: seg(latents, noise)))
        if "cached" not in cfg.modes:
            return
        store: dict = {}

        def query_step() -> None:
            store.clear()
            with autocast(device, cfg.precision):
                store["q"] = seg.compute_queries(latents, noise)

        measure("queries", "cached", prompts, query_step)
        # held as the training loop holds them: fp16 rows on the CPU, batched onto the device per step
        cache = QueryCache({n: q.transpose(0, 1).half().cpu().contiguous() for n, q in store.pop("q").items()})
        info["query_cache_mib_per_image"][prompts] = sum(t[0].numel() * 2 for t in cache._tensors.values()) / MIB
        seg.recorder.reset()  # drops the recorder's own reference to the last queries
        rows_idx = torch.arange(cfg.batch)
        measure("train", "cached", prompts, lambda: train_step(lambda: seg.forward_cached(cache.batch(rows_idx, device), (side, side))))

    for prompts in cfg.prompts:
        seg = segmenter(prompts)
        train_rows(prompts, seg)
        seg.recorder.reset()
        if cfg.infer:
            measure("infer", "full", prompts, partial(infer_step, seg))
            seg.recorder.reset()
            if prompts == cfg.exit_layout:
                no_exit = segmenter(prompts, early_exit=False)
                measure("infer", "full", prompts, partial(infer_step, no_exit), early_exit=False)
                no_exit.recorder.reset()
    return rows, info


def add_ratios(rows: list[Row]) -> None:
    """step time / the same arch's full + paired (early exit on) row of the same kind; queries vs training."""
    base = {(r.arch, r.kind): r.step_ms for r in rows if r.mode == "full" and r.prompts == "paired" and r.early_exit}
    for r in rows:
        ref = base.get((r.arch, "train" if r.kind == "queries" else r.kind))
        r.ratio = r.step_ms / ref if ref else None


def evaluate_targets(rows: list[Row], device: torch.device, device_name: str, precision: str) -> list[str]:
    """PASS / FAIL / N.A. lines for the project's speed and memory targets (all on sd21)."""
    lines = []
    cached = [r for r in rows if r.arch == "sd21" and (r.kind, r.mode) == ("train", "cached")]
    what = f"cached training >= {CACHED_SPEEDUP_TARGET:.0f}x faster than full+paired at the same batch (sd21)"
    if not any(r.ratio for r in cached):
        lines.append(f"N.A.  {what}: needs sd21 full and cached rows")
    for r in (r for r in cached if r.ratio):
        verdict = "PASS" if 1 / r.ratio >= CACHED_SPEEDUP_TARGET else "FAIL"
        lines.append(f"{verdict}  {what}, {r.prompts}, batch {r.batch}: {1 / r.ratio:.1f}x")
    what = f"cached training peak <= {CACHED_MEMORY_TARGET_GB:.0f} GB beyond the weights (sd21, batch 8, mixed precision)"
    eligible = [r for r in cached if device.type == "cuda" and precision != "fp32" and r.batch == 8]
    if not eligible:
        lines.append(f"N.A.  {what}: needs a CUDA run of sd21 cached at batch 8 with bf16/fp16")
    for r in eligible:
        gb = r.peak_mib * MIB / 1e9
        lines.append(f"{'PASS' if gb <= CACHED_MEMORY_TARGET_GB else 'FAIL'}  {what}, {r.prompts}: {gb:.2f} GB")
    infer = [r for r in rows if r.arch == "sd21" and r.kind == "infer" and r.early_exit]
    what = f"inference <= {INFER_MS_TARGET:.0f} ms per image on an H100 (sd21)"
    on_h100 = device.type == "cuda" and "H100" in device_name
    if not on_h100 or not infer:
        measured = ", ".join(f"{r.prompts} {r.step_ms / r.batch:.0f} ms" for r in infer)
        lines.append(f"N.A.  {what}: device is {device_name}" + (f" (measured per image: {measured})" if measured else ""))
    for r in infer if on_h100 else []:
        ms = r.step_ms / r.batch
        lines.append(f"{'PASS' if ms <= INFER_MS_TARGET else 'FAIL'}  {what}, {r.prompts}, batch {r.batch}: {ms:.1f} ms")
    return lines


def format_table(rows: list[Row]) -> str:
    head = (f"{'arch':5s} {'row':36s} {'batch':>5s} {'steps':>5s} {'median ms':>10s} {'best ms':>10s} {'warm-up ms':>10s} "
            f"{'ms/img':>9s} {'img/s':>7s} {'peak MiB':>9s} {'ratio':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r.ratio:6.3f}" if r.ratio is not None else f"{'-':>6s}"
        warm = f"{r.warmup_ms[0]:10.1f}" if r.warmup_ms else f"{'-':>10s}"
        lines.append(f"{r.arch:5s} {r.label:36s} {r.batch:5d} {f'{len(r.warmup_ms)}+{len(r.times_ms)}':>5s} {r.step_ms:10.1f} "
                     f"{min(r.times_ms):10.1f} {warm} {r.step_ms / r.batch:9.1f} {r.images_per_s:7.2f} {r.peak_mib:9.1f} {ratio}")
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch threads: {torch.get_num_threads()}, torch {torch.__version__}"


def _split(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items or any(v not in allowed for v in items):
        raise typer.BadParameter(f"{option}={value!r}: expected a comma list of {', '.join(allowed)}")
    return items


def _levels(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--levels={value!r}: expected a comma list of integers, e.g. 0,1,2") from None


app = typer.Typer(add_completion=False)


@app.command()
def main(
    arch: str = typer.Option("tiny,sd21", help="architectures: tiny, sd21 (SD-2.1-base layers, random weights)"),
    batch: int | None = typer.Option(None, min=1, help="images per step; default 8 (CPU: 8 tiny, 1 sd21)"),
    steps: int | None = typer.Option(None, min=1, help="timed steps per row; default per device, arch and mode"),
    warmup: int | None = typer.Option(None, min=0, help="untimed steps before them"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16"),
    modes: str = typer.Option("full,cached", help="training modes: full, cached, or none (inference rows only)"),
    prompts: str = typer.Option("paired,joint", help="prompt layouts"),
    infer: bool = typer.Option(True, help="inference rows (early exit on, and off for one layout)"),
    image_size: int | None = typer.Option(None, min=8, help="pixels the latents stand for; default 128 tiny, 512 sd21"),
    levels: str | None = typer.Option(None, help="attention levels, e.g. 0,1,2; default 0,1 tiny, 0,1,2 sd21"),
    seed: int = typer.Option(0, help="weights, latents, noise and masks"),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch; 0 = torch's default (one per core)"),
    json_path: str | None = typer.Option(None, "--json", help="also write the rows, facts and targets as JSON here"),
) -> None:
    archs = _split(arch, tuple(ARCHS), "--arch")
    mode_list = [] if modes == "none" else _split(modes, ("full", "cached"), "--modes")
    prompt_list = _split(prompts, ("paired", "joint"), "--prompts")
    level_list = _levels(levels) if levels else None
    dev = pick_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device=cuda: no CUDA device visible to torch")
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"--precision={precision!r}: expected {', '.join(PRECISIONS)}")
    if threads:
        torch.set_num_threads(threads)  # on shared cores one thread can beat two that wait for each other
    device_name, load = describe_device(dev), os.getloadavg()
    command = " ".join(["python -m d2dprompt.bench.steps", *sys.argv[1:]])
    print(f"d2dprompt.bench.steps {datetime.datetime.now().isoformat(timespec='seconds')}: {command}")
    print(f"device: {device_name}; precision {precision}")
    print(f"load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores (shared machines make timings noisy)")
    all_rows: list[Row] = []
    facts: dict[str, dict] = {}
    for name in archs:
        spec = ARCHS[name]
        schedule = spec.cpu_schedule if dev.type == "cpu" else GPU_SCHEDULE
        override = (warmup, steps, warmup, steps)
        schedule = tuple(default if given is None else given for default, given in zip(schedule, override))
        cfg = Settings(batch or (spec.cpu_batch if dev.type == "cpu" else 8), schedule, image_size or spec.image_size,
                       level_list or list(spec.levels), mode_list, prompt_list, precision, infer, seed)
        start = time.perf_counter()
        sd = spec.build(seed).to(dev)
        if cfg.image_size % sd.vae_scale:
            raise typer.BadParameter(f"--image-size={cfg.image_size}: must be a multiple of the {name} VAE factor {sd.vae_scale}")
        print(f"{name}: built in {time.perf_counter() - start:.1f} s; batch {cfg.batch}, image {cfg.image_size} px, levels {cfg.levels}", flush=True)
        try:
            rows, facts[name] = bench_arch(name, sd, cfg, dev)
        except ValueError as err:  # e.g. levels the UNet lacks, named by build_segmenter
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        all_rows += rows
        del sd
        release_memory(dev)
    add_ratios(all_rows)
    print("\n" + format_table(all_rows) + "\n")
    for name, info in facts.items():
        cache = ", ".join(f"{p} {mib:.1f} MiB" for p, mib in info["query_cache_mib_per_image"].items()) or "-"
        print(f"{name}: frozen weights {info['weights_mib']:.0f} MiB; query cache per image (fp16): {cache}")
        print(f"{name}: early exit stops the UNet after {info.get('early_exit_after', '-')}")
        pair = {r.early_exit: r.step_ms for r in all_rows if r.arch == name and r.kind == "infer" and r.prompts == info["exit_layout"]}
        if len(pair) == 2:
            saving = 100 * (1 - pair[True] / pair[False])
            print(f"{name}: early exit saves {saving:.1f}% of {info['exit_layout']} inference ({pair[False]:.1f} -> {pair[True]:.1f} ms per batch)")
    targets = evaluate_targets(all_rows, dev, device_name, precision)
    print("\n" + "\n".join(targets))
    if json_path:
        rows_out = [asdict(r) | {"label": r.label} for r in all_rows]
        write_json(json_path, {"command": command, "device": device_name, "precision": precision, "load_average": list(load),
                               "rows": rows_out, "facts": facts, "targets": targets})


if __name__ == "__main__":
    app()
