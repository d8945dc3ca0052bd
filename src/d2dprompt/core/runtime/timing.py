"""Wall-clock timing of a step, CUDA synchronised: what every benchmark (bench/, a method's bench.py) measures with."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm import tqdm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], warmup: int, steps: int, device: torch.device, desc: str = "") -> tuple[list[float], list[float]]:
    """Milliseconds of `warmup` untimed calls (kept for the record), then of `steps` timed calls."""
    times = []
    for _ in tqdm(range(warmup + steps), desc=desc, unit="step", leave=False, disable=not desc):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times[:warmup], times[warmup:]
