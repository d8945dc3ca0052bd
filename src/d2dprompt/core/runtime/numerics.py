"""Portable CPU numerics: the DVC stages compute the same bits on every x86-64 CPU with AVX2 (README "Reproducibility").

A float sum depends on the order its terms are added in, and on a CPU that order is chosen by the kernels the
machine picks: PyTorch's vectorised kernels (AVX2 or AVX-512), MKL's matrix products (one code path per
instruction set), oneDNN's convolutions, OpenBLAS's kernels (numpy's and faiss's), faiss's own, and the number of
threads a reduction is split across. Measured on the embedded default (an AMD CPU): PyTorch's kernels, MKL's path
and the thread count each change the stored latents alone, and with them every metric in the 3rd or 4th digit;
OpenBLAS's SSE3 kernels change the bootstrap intervals; oneDNN's ISA did not change anything there and is pinned for
the CPUs where it may. `pin()` fixes them all before torch loads; `D2D_CPU=native` leaves the machine's choice.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Mapping, MutableMapping

MODE_VAR = "D2D_CPU"
MODES = ("portable", "native")
THREADS = 2  # a reduction's split, fixed; 2 = the smallest machine the pipeline is tested on, so none oversubscribes much
PORTABLE = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's vectorised kernels: the widest set every AVX2 CPU has
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: one code path on Intel and AMD alike
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's convolutions
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's and faiss's OpenBLAS: its AVX2 kernels (the bootstrap's sums go through it)
    "FAISS_OPT_LEVEL": "avx2",  # faiss's own distance kernels (patchknn, the few-shot memory)
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")  # the ones kernels dispatch on


class NumericsError(ValueError):
    pass


def pin(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set the portable kernels and thread count in `environ` (overriding what was there) unless D2D_CPU=native.

    Must run before torch is imported: PyTorch, MKL and oneDNN read these once, at their first use."""
    mode = environ.get(MODE_VAR, MODES[0])
    if mode not in MODES:
        raise NumericsError(f"{MODE_VAR}={mode!r}: must be one of {', '.join(MODES)}")
    if mode == "portable":
        environ.update(PORTABLE)
        if environ is os.environ:  # this process's own: its commands fix their thread count too (fix_threads)
            global _pinned
            _pinned = True
    return mode


_pinned = False  # pin() ran with the portable setting in this process


def fix_threads() -> None:
    """After pin(), the thread count itself: torch caps OMP_NUM_THREADS at the machine's cores, which would give a
    1-core machine other bits (measured: 1 and 3 threads each sum the VAE's convolutions differently from 2)."""
    if not _pinned:
        return
    try:
        import torch
    except ImportError:  # the torch-free install that scores an exported folder: onnxruntime keeps its own threads
        return
    torch.set_num_threads(THREADS)


def record(device: str = "cpu", environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What the numbers depend on, as strings (`dvc metrics show` leaves them out): the same on every AVX2 machine
    under the portable setting, so a fresh clone's metrics file stays byte-identical. On CUDA the GPU model and
    its libraries decide instead (not pinned: cuDNN and cuBLAS choose kernels per GPU), so they are named."""
    import numpy as np
    import torch

    found = {"device": device}
    if device.startswith("cuda"):
        found.update({"gpu": torch.cuda.get_device_name(torch.device(device)), "cuda": str(torch.version.cuda)})
    return {
        **found,
        "cpu": environ.get(MODE_VAR, MODES[0]),
        "arch": platform.machine(),
        "aten_kernels": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": environ.get("MKL_CBWR", "machine"),
        "onednn_isa": environ.get("ONEDNN_MAX_CPU_ISA", "machine"),
        "openblas": environ.get("OPENBLAS_CORETYPE", "machine"),
        "faiss": environ.get("FAISS_OPT_LEVEL", "machine"),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The CPU's name and which of FLAGS it has ("unknown", [] where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "unknown", []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    have = set(fields.get("flags", "").split())
    return fields.get("model name", "unknown"), [f for f in FLAGS if f in have]


def machine_tags(device: str = "cpu", environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The machine a run was made on, for MLflow: the CPU itself beside what the numbers depend on."""
    model, flags = cpu_model()
    tags = {f"numerics.{k}": v for k, v in record(device, environ).items()}
    tags.update({"machine.cpu": model, "machine.cpu_flags": " ".join(flags) or "none", "machine.cores": str(os.cpu_count() or 0)})
    return tags
