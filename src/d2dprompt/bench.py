"""python -m d2dprompt.bench [--arch tiny,sd21] [--batch N] [--steps N] [--warmup N] [--device auto|cpu|cuda] [--json PATH]

Speed and memory of the training and inference paths, in one process, per architecture:
- train:   forward + loss (focal + dice + image, weights 1) against random blob masks + backward + Adam
           step on the prompt parameters. `full` runs the frozen UNet every step; `cached` reads queries
           computed once (`queries` rows time that one-off pass, per image) and runs only the text
           encoder, `to_k` and the softmax.
- infer:   no_grad, a batch of latents -> anomaly maps through the real UNet (full mode), early exit on,
           and once off to show what stopping after the last captured layer saves.
`sd21` is the SD-2.1-base architecture (published configs) with random weights: speed and memory do
not depend on the weights. Latents are random, at the size the VAE makes from `--image-size` pixels.
Per row: median step time over the timed steps, images/s, peak memory beyond the frozen weights (CUDA:
max_memory_allocated minus the weights' bytes; CPU: peak RSS during the row minus RSS at its start,
sampled with psutil, or the growth of the process peak from getrusage without it) and the step time
relative to the same architecture's `full + paired` row of the same kind (queries rows: vs training).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import diffusers
import torch
import typer
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from d2dprompt.attention import cross_attention_levels
from d2dprompt.config import AttentionParams, ModelParams, PromptParams
from d2dprompt.losses import total_loss
from d2dprompt.models import FrozenSD, _freeze, autocast, build_tiny, bundled_clip_tokenizer, pick_device
from d2dprompt.outputs import write_json
from d2dprompt.query_cache import QueryCache
from d2dprompt.segmenter import D2DSegmenter, build_segmenter, fixed_noise

MIB = 2**20
LOSS_WEIGHTS = {"focal": 1.0, "dice": 1.0, "image": 1.0}  # the default loss block: the terms every run pays for
CACHED_SPEEDUP_TARGET = 20.0  # cached training must beat full + paired by this factor (sd21)
CACHED_MEMORY_TARGET_GB = 3.0  # cached training at batch 8, mixed precision, beyond the frozen weights
INFER_MS_TARGET = 20.0  # per image on an H100, the fast end of CLIP-based zero-shot detectors (16-155 ms)


def build_sd21_architecture(seed: int = 0) -> FrozenSD:
    """stabilityai/stable-diffusion-2-1-base's unet/text_encoder/vae configs, random weights from `seed`."""
    tokenizer = bundled_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,  # OpenCLIP ViT-H/14 minus its last layer, as SD 2 reads the penultimate one
            num_attention_heads=16,
            hidden_act="gelu",
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            projection_dim=512,
            bos_token_id=0,  # the published config's legacy ids (0/1/2); only pooling reads them, we do not pool
            pad_token_id=1,
            eos_token_id=2,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),  # diffusers reads these as head counts (64 channels per head)
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=False,  # 2.1-base (512 px) does not upcast; the 768 px 2.1 does
        norm_num_groups=32,
        norm_eps=1e-5,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=768,  # as published for 2.1-base (a config quirk; it does not change any layer)
        scaling_factor=0.18215,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return _freeze(FrozenSD(tokenizer, text_encoder, unet, vae, scheduler))


@dataclass(frozen=True)
class Arch:
    build: Callable[[int], FrozenSD]
    image_size: int  # the pixels its VAE expects
    levels: tuple[int, ...]  # attention levels read by default
    cpu_batch: int  # CPU default batch: full sd21 steps cost ~10-25 s per image on 2 threads


ARCHS = {
    "tiny": Arch(build_tiny, 128, (0, 1), 8),  # ModelParams/AttentionParams defaults
    "sd21": Arch(build_sd21_architecture, 512, (0, 1, 2), 1),  # 64, 32, 16 latent sides
}


@dataclass
class Row:
    arch: str
    kind: str  # train | queries | infer
    mode: str  # full | cached
    prompts: str  # paired | joint
    early_exit: bool
    batch: int
    warmup: int
    steps: int
    step_ms: float  # median over the timed steps
    images_per_s: float
    peak_mib: float  # beyond the frozen weights (see the module docstring)
    ratio: Optional[float] = None  # step_ms / the same arch's full + paired step_ms of the same kind
    times_ms: list[float] = field(default_factory=list)  # the timed steps
    warmup_ms: list[float] = field(default_factory=list)  # the untimed ones: first-call set-up shows here

    @property
    def label(self) -> str:
        exit_note = "" if self.early_exit else ", no early exit"
        return f"{self.kind} {self.mode}+{self.prompts}{exit_note}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: torch.device) -> None:
    """Hand freed memory back so each row's peak starts from what is really resident."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas otherwise, inflating the baseline
        except OSError:
            pass


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak minus `weights_bytes`, or sampled CPU RSS growth."""

    def __init__(self, device: torch.device, weights_bytes: int, interval_s: float = 0.005):
        self.device, self.weights_bytes, self.interval_s = device, weights_bytes, interval_s
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        _release_memory(self.device)
        if self.device.type != "cuda":
            try:
                import psutil

                self._rss = psutil.Process().memory_info
            except ImportError:
                self._rss = None
            self._start = self._rss().rss if self._rss else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self._max = self._start
            self._stop = threading.Event()
            if self._rss:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._rss().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.weights_bytes
            return
        self._stop.set()
        if self._rss:
            self._thread.join()
            self._max = max(self._max, self._rss().rss)
        else:
            self._max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = self._max - self._start


def timed(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Milliseconds of `warmup` calls (reported, not counted), then of `steps` timed calls."""
    times = []
    for _ in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times[:warmup], times[warmup:]


def blob_masks(batch: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random disk per anomalous image (every other image is normal): masks (B, side, side), labels (B,)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    labels = (torch.arange(batch) % 2 == 0).float()
    masks = torch.zeros(batch, side, side)
    for i in range(batch):
        if labels[i]:
            cy, cx = torch.rand(2, generator=gen) * side
            radius = side * (0.05 + 0.15 * torch.rand(1, generator=gen))
            masks[i] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).float()
    return masks, labels


@dataclass
class Settings:
    batch: int
    warmup_full: int
    steps_full: int
    warmup_cached: int
    steps_cached: int
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


def default_schedule(arch: str, device: torch.device) -> tuple[int, int, int, int]:
    """(warmup, steps) for UNet-running rows, then for cached rows: the CPU default run fits in 10 minutes."""
    if device.type == "cuda":
        return 3, 10, 3, 10
    if arch == "sd21":
        return 1, 1, 1, 3  # a full sd21 step is 10-60 s on 2 threads: more would break the 10-minute budget
    return 1, 3, 1, 3


def bench_arch(name: str, sd: FrozenSD, cfg: Settings, device: torch.device) -> tuple[list[Row], dict]:
    """All rows of one architecture, and facts about it (weights, query cache size per image)."""
    weights_bytes = sum(
        t.numel() * t.element_size() for m in (sd.text_encoder, sd.unet, sd.vae) for t in [*m.parameters(), *m.buffers()]
    )
    side = cfg.image_size // sd.vae_scale
    latents = torch.randn(cfg.batch, sd.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(cfg.seed))
    keys = [f"bench{i}" for i in range(cfg.batch)]
    noise = fixed_noise(keys, tuple(latents.shape[1:]), cfg.seed)
    latents, noise = latents.to(device), noise.to(device)
    masks, labels = (t.to(device) for t in blob_masks(cfg.batch, side, cfg.seed))
    rows: list[Row] = []
    info = {"weights_mib": weights_bytes / MIB, "latent_side": side, "levels": cfg.levels, "exit_layout": cfg.exit_layout, "query_cache_mib_per_image": {}}
    layers = list(cross_attention_levels(sd.unet).items())
    last_read = max((i for i, (_, level) in enumerate(layers) if level in cfg.levels), default=None)
    if last_read is not None:  # unknown levels are reported by build_segmenter
        info["early_exit_after"] = f"{layers[last_read][0].removesuffix('.processor')} (cross-attention layer {last_read + 1} of {len(layers)})"

    def measure(kind, mode, prompts, step, early_exit=True) -> None:
        warmup, steps = (cfg.warmup_cached, cfg.steps_cached) if kind == "train" and mode == "cached" else (cfg.warmup_full, cfg.steps_full)
        with PeakMemory(device, weights_bytes) as mem:
            warm, times = timed(step, warmup, steps, device)
        median = statistics.median(times)
        row = Row(name, kind, mode, prompts, early_exit, cfg.batch, warmup, steps, median, cfg.batch * 1000 / median, mem.peak_bytes / MIB, times_ms=times, warmup_ms=warm)
        rows.append(row)
        print(f"  {name:5s} {row.label:38s} {median:10.1f} ms  {row.peak_mib:9.1f} MiB", flush=True)

    def segmenter(prompts: str, early_exit: bool = True) -> D2DSegmenter:
        torch.manual_seed(cfg.seed)
        attention = AttentionParams(levels=cfg.levels, prompts=prompts)
        return build_segmenter(sd, PromptParams(), attention, ModelParams(), early_exit).to(device)

    for prompts in cfg.prompts:
        seg = segmenter(prompts)
        optimizer = torch.optim.Adam(seg.prompts.parameters(), lr=1e-3, betas=(0.5, 0.999))

        def train_step(forward: Callable[[], dict]) -> None:
            with autocast(device, cfg.precision):
                maps = forward()
            maps = {k: v.float() for k, v in maps.items()}
            loss, _ = total_loss(maps, masks, labels, LOSS_WEIGHTS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        if "full" in cfg.modes:
            measure("train", "full", prompts, lambda: train_step(lambda: seg(latents, noise)))
        if "cached" in cfg.modes:
            store = {}

            def query_step() -> None:
                with autocast(device, cfg.precision):
                    store["q"] = seg.compute_queries(latents, noise)

            measure("queries", "cached", prompts, query_step)
            # held as the training loop holds them: fp16 rows on the CPU, batched onto the device per step
            cache = QueryCache({n: q.transpose(0, 1).half().cpu().contiguous() for n, q in store.pop("q").items()})
            per_image = sum(t[0].numel() * 2 for t in cache._tensors.values())
            info["query_cache_mib_per_image"][prompts] = per_image / MIB
            rows_idx = torch.arange(cfg.batch)
            seg.recorder.reset()  # drops the recorder's own reference to the last queries
            measure("train", "cached", prompts, lambda: train_step(lambda: seg.forward_cached(cache.batch(rows_idx, device), (side, side))))
            del cache
        del optimizer
        seg.recorder.reset()
        if not cfg.infer:
            continue

        def infer_step(model: D2DSegmenter = seg) -> None:
            with torch.no_grad(), autocast(device, cfg.precision):
                model(latents, noise)["anomaly"].float()

        measure("infer", "full", prompts, infer_step)
        seg.recorder.reset()
        if prompts == cfg.exit_layout:
            no_exit = segmenter(prompts, early_exit=False)
            measure("infer", "full", prompts, lambda: infer_step(no_exit), early_exit=False)
            no_exit.recorder.reset()
            del no_exit
        del seg
    return rows, info


def add_ratios(rows: list[Row]) -> None:
    """step time / the same arch's full + paired (early exit on) row of the same kind; queries vs training."""
    base = {(r.arch, r.kind): r.step_ms for r in rows if r.mode == "full" and r.prompts == "paired" and r.early_exit}
    for r in rows:
        ref = base.get((r.arch, "train" if r.kind == "queries" else r.kind))
        r.ratio = r.step_ms / ref if ref else None


def evaluate_targets(rows: list[Row], device: torch.device, device_name: str, precision: str) -> list[str]:
    """PASS / FAIL / N.A. lines for the project's speed and memory targets."""
    lines = []
    sd21 = [r for r in rows if r.arch == "sd21"]
    cached = [r for r in sd21 if r.kind == "train" and r.mode == "cached"]
    if not cached or not any(r.ratio for r in cached):
        lines.append(f"N.A.  cached training >= {CACHED_SPEEDUP_TARGET:.0f}x faster than full+paired (sd21): needs sd21 full and cached rows")
    for r in cached:
        if r.ratio:
            verdict = "PASS" if 1 / r.ratio >= CACHED_SPEEDUP_TARGET else "FAIL"
            lines.append(f"{verdict}  cached training >= {CACHED_SPEEDUP_TARGET:.0f}x faster than full+paired (sd21, {r.prompts}, batch {r.batch}): {1 / r.ratio:.1f}x")
    what = f"cached training peak <= {CACHED_MEMORY_TARGET_GB:.0f} GB beyond the weights (sd21, batch 8, mixed precision)"
    eligible = [r for r in cached if device.type == "cuda" and precision != "fp32" and r.batch == 8]
    if not eligible:
        lines.append(f"N.A.  {what}: needs a CUDA run of sd21 cached at batch 8 with bf16/fp16")
    for r in eligible:
        gb = r.peak_mib * MIB / 1e9
        lines.append(f"{'PASS' if gb <= CACHED_MEMORY_TARGET_GB else 'FAIL'}  {what}, {r.prompts}: {gb:.2f} GB")
    infer = [r for r in sd21 if r.kind == "infer" and r.early_exit]
    what = f"inference <= {INFER_MS_TARGET:.0f} ms per image on an H100 (sd21)"
    if device.type != "cuda" or "H100" not in device_name or not infer:
        measured = ", ".join(f"{r.prompts} {r.step_ms / r.batch:.0f} ms" for r in infer)
        lines.append(f"N.A.  {what}: device is {device_name}" + (f" (measured {measured} per image)" if measured else ""))
    for r in infer if device.type == "cuda" and "H100" in device_name else []:
        ms = r.step_ms / r.batch
        lines.append(f"{'PASS' if ms <= INFER_MS_TARGET else 'FAIL'}  {what}, {r.prompts}, batch {r.batch}: {ms:.1f} ms")
    return lines


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'arch':5s} {'row':36s} {'batch':>5s} {'steps':>7s} {'median ms':>10s} {'best ms':>10s} {'warm-up ms':>10s} "
        f"{'ms/img':>9s} {'img/s':>8s} {'peak MiB':>9s} {'ratio':>7s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r.ratio:7.3f}" if r.ratio is not None else f"{'-':>7s}"
        warm = f"{r.warmup_ms[0]:10.1f}" if r.warmup_ms else f"{'-':>10s}"
        lines.append(
            f"{r.arch:5s} {r.label:36s} {r.batch:5d} {f'{r.warmup}+{r.steps}':>7s} {r.step_ms:10.1f} {min(r.times_ms):10.1f} {warm} "
            f"{r.step_ms / r.batch:9.1f} {r.images_per_s:8.2f} {r.peak_mib:9.1f} {ratio}"
        )
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _split(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise typer.BadParameter(f"{option}={value!r}: expected a comma list of {', '.join(allowed)}")
    return items


app = typer.Typer(add_completion=False)


@app.command()
def main(
    arch: str = typer.Option("tiny,sd21", help="architectures: tiny, sd21 (SD-2.1-base layers, random weights)"),
    batch: Optional[int] = typer.Option(None, min=1, help="images per step; default 8 (CPU: 8 tiny, 1 sd21)"),
    steps: Optional[int] = typer.Option(None, min=1, help="timed steps per row; default per device/arch/mode"),
    warmup: Optional[int] = typer.Option(None, min=0, help="untimed steps before them"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto = bf16 autocast on CUDA, fp32 on CPU; fp32 | bf16 | fp16"),
    modes: str = typer.Option("full,cached", help="training modes: full, cached, or none (inference rows only)"),
    prompts: str = typer.Option("paired,joint", help="prompt layouts"),
    infer: bool = typer.Option(True, help="inference rows (early exit on, and off once: joint if measured)"),
    image_size: Optional[int] = typer.Option(None, min=8, help="pixels the latents stand for; default 128 tiny, 512 sd21"),
    levels: Optional[str] = typer.Option(None, help="attention levels, e.g. 0,1,2; default 0,1 tiny, 0,1,2 sd21"),
    seed: int = typer.Option(0, help="weights, latents, noise and masks"),
    json_path: Optional[str] = typer.Option(None, "--json", help="also write the rows and facts as JSON here"),
) -> None:
    archs = _split(arch, tuple(ARCHS), "--arch")
    mode_list = [] if modes == "none" else _split(modes, ("full", "cached"), "--modes")
    prompt_list = _split(prompts, ("paired", "joint"), "--prompts")
    dev = pick_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device=cuda: no CUDA device visible to torch")
    autocast(dev, precision)  # validates the name
    device_name = describe_device(dev)
    load = os.getloadavg()
    command = "python -m d2dprompt.bench " + " ".join(sys.argv[1:])
    print(f"d2dprompt.bench  {datetime.datetime.now().isoformat(timespec='seconds')}  ({command.strip()})")
    print(f"device: {device_name}; precision: {precision}; diffusers {diffusers.__version__}")
    print(f"load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores (shared machines make timings noisy)")
    all_rows: list[Row] = []
    facts = {}
    for name in archs:
        spec = ARCHS[name]
        w_full, s_full, w_cached, s_cached = default_schedule(name, dev)
        cfg = Settings(
            batch=batch or (8 if dev.type == "cuda" else spec.cpu_batch),
            warmup_full=w_full if warmup is None else warmup,
            steps_full=s_full if steps is None else steps,
            warmup_cached=w_cached if warmup is None else warmup,
            steps_cached=s_cached if steps is None else steps,
            image_size=image_size or spec.image_size,
            levels=[int(v) for v in levels.split(",")] if levels else list(spec.levels),
            modes=mode_list,
            prompts=prompt_list,
            precision=precision,
            infer=infer,
            seed=seed,
        )
        start = time.perf_counter()
        sd = spec.build(seed).to(dev)
        print(f"{name}: built in {time.perf_counter() - start:.1f} s; batch {cfg.batch}, image {cfg.image_size} px, levels {cfg.levels}", flush=True)
        rows, info = bench_arch(name, sd, cfg, dev)
        info["build_s"] = time.perf_counter() - start
        all_rows += rows
        facts[name] = info
        del sd
        _release_memory(dev)
    add_ratios(all_rows)
    print()
    print(format_table(all_rows))
    print()
    for name, info in facts.items():
        cache = ", ".join(f"{p} {mib:.1f} MiB" for p, mib in info["query_cache_mib_per_image"].items()) or "-"
        print(f"{name}: frozen weights {info['weights_mib']:.0f} MiB; query cache per image (fp16): {cache}")
        print(f"{name}: early exit stops the UNet after {info.get('early_exit_after', '-')}")
        rows = [r for r in all_rows if r.arch == name and r.kind == "infer" and r.prompts == info["exit_layout"]]
        on, off = ([r.step_ms for r in rows if r.early_exit == flag] for flag in (True, False))
        if on and off:
            print(f"{name}: early exit saves {100 * (1 - on[0] / off[0]):.1f}% of inference ({off[0]:.1f} -> {on[0]:.1f} ms per batch)")
    targets = evaluate_targets(all_rows, dev, device_name, precision)
    print()
    print("\n".join(targets))
    if json_path:
        write_json(json_path, {
            "command": command, "device": device_name, "precision": precision, "load_average": list(load),
            "rows": [asdict(r) | {"label": r.label} for r in all_rows], "facts": facts, "targets": targets,
        })


if __name__ == "__main__":
    app()
