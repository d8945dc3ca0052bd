"""Several processes for the queries, train and evaluate stages, started by torchrun (PyTorch's own launcher).

dvc.yaml runs those stages under torchrun (`python -m d2dprompt.core.runtime.launch --standalone
--nproc_per_node=${distributed.nproc} -m d2dprompt.pipeline.<stage>`, launch.py: torchrun with one-line errors).
One process (`python -m d2dprompt.<stage>`, or torchrun with one) makes no process group, and every helper
here is then the identity: the stage runs exactly as it always did. When torchrun starts several
(WORLD_SIZE > 1), `process_group` joins them (distributed.backend: nccl on CUDA, gloo on CPU), each takes
the GPU of its LOCAL_RANK (`device`), and:

- `shard(n, block)`: the contiguous range of row positions this process works on. Ranks 0..W-1 take
  consecutive ranges, so `gather` of per-row results restores the original order; range bounds fall on
  multiples of `block` (the stage's batch size), so every batch holds the rows one process would batch.
- `gather(rows)`: a tensor's or numpy array's rows (any number on each process, None for none)
  concatenated in rank order, on rank 0 (None elsewhere) or, with `to_all`, on every process.
- `gather_objects(obj)`: small picklable records (predict's result lines) from every process, on rank 0.
- `all_reduce_sum(tensors)`: each tensor summed over the processes, in place (data-parallel gradients).
- `is_main()`: rank 0, the one process that writes outputs, logs to MLflow, prints and draws progress
  bars; `main_run(stage, params)` opens the MLflow run there and gives the others tracking.UntrackedRun.
- `barrier()`.

Failures: a stage that fails exits non-zero on the process that failed, and torchrun then stops the
others and exits non-zero itself. Should a process die without torchrun noticing, one waiting on it in a
collective stops after `distributed.timeout_s` (the process group's timeout) instead of hanging.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads when a stage runs, not for --help
    import torch

    from d2dprompt.core.runtime.config import DistributedParams

_comm_device: Any = None  # where collectives run: cuda:LOCAL_RANK for nccl, the CPU for gloo
GATHER_CHUNK = 64 * 2**20  # bytes per process and round of a gather: bounds the GPU memory a large one takes


def launched_processes() -> int:
    """How many processes torchrun started for this job (its WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _group():
    """torch.distributed when this process is in a process group, else None (torch need not even be loaded)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    """The process that writes, logs and prints: rank 0, or the only one."""
    return rank() == 0


def device(name: str) -> torch.device:
    """The device this process computes on: model.device (models.pick_device) for one process; with several,
    `auto` and `cuda` mean this process's own GPU, cuda:LOCAL_RANK."""
    import torch

    from d2dprompt.core.models import pick_device

    chosen = pick_device(name)
    if launched_processes() > 1 and chosen.type == "cuda":
        if chosen.index is not None:
            raise ValueError(f"model.device={name} puts every process on one GPU; with several processes use auto or cuda "
                             "(each takes cuda:LOCAL_RANK)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return chosen


def backend(choice: str, where: torch.device) -> str:
    """distributed.backend: auto = nccl for processes on GPUs, gloo on the CPU."""
    if choice != "auto":
        return choice
    return "nccl" if where.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(params: DistributedParams, device_name: str) -> Iterator[None]:
    """Join torchrun's process group for the `with` body when it started several processes; nothing otherwise.

    torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) says whom to join. A body that ends
    normally meets the others at a barrier, so no process leaves while another still needs it; one that
    raises leaves at once without tearing the group down (that could wait on the others), and its
    non-zero exit makes torchrun stop them.
    """
    global _comm_device
    if launched_processes() == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    where = device(device_name)
    chosen = backend(params.backend, where)
    if chosen == "nccl":
        if where.type != "cuda":
            raise ValueError(f"distributed.backend=nccl needs a GPU for each process; this one computes on {where}: use gloo or auto")
        torch.cuda.set_device(where)
    dist.init_process_group(chosen, timeout=timedelta(seconds=params.timeout_s))
    _comm_device = where if chosen == "nccl" else torch.device("cpu")
    yield
    dist.barrier()
    dist.destroy_process_group()
    _comm_device = None


def barrier() -> None:
    dist = _group()
    if dist:
        dist.barrier()


def shard_range(n: int, rank: int, world: int, block: int = 1) -> range:
    """Rank `rank`'s share of positions 0..n-1: consecutive whole blocks of `block`, the counts of blocks
    differing by at most one between ranks (the last block may be short); an empty range when there are
    fewer blocks than processes."""
    blocks = -(-n // block)
    per, extra = divmod(blocks, world)
    start = rank * per + min(rank, extra)
    stop = start + per + (1 if rank < extra else 0)
    return range(min(start * block, n), min(stop * block, n))


def shard(n: int, block: int = 1) -> range:
    """This process's share of positions 0..n-1 (all of them for one process); see shard_range."""
    return shard_range(n, rank(), world_size(), block)


def gather(rows: Any, to_all: bool = False) -> Any:
    """Rows from every process, concatenated in rank order: on rank 0 (None on the others), or on every
    process with `to_all`. `rows` is a tensor or numpy array (its first axis counts rows; the others and
    the dtype must agree between processes) or None for no rows; tensors come back on the CPU, arrays as
    arrays; None when no process had rows. One process: `rows` unchanged.

    Sent as bytes (any dtype) in rounds of at most GATHER_CHUNK bytes per process, so a large gather
    (a query cache) never needs more than world size x GATHER_CHUNK on a GPU at once."""
    dist = _group()
    if dist is None:
        return rows
    import torch

    as_numpy = isinstance(rows, np.ndarray)
    tensor = None if rows is None else (torch.from_numpy(np.ascontiguousarray(rows)) if as_numpy else rows.detach())
    meta = None if tensor is None else (tuple(tensor.shape), tensor.dtype, as_numpy)
    metas: list = [None] * dist.get_world_size()
    dist.all_gather_object(metas, meta)
    if all(m is None for m in metas):
        return None
    sizes = [0 if m is None else math.prod(m[0]) * m[1].itemsize for m in metas]
    mine = tensor.contiguous().reshape(-1).view(torch.uint8).cpu() if sizes[dist.get_rank()] else torch.zeros(0, dtype=torch.uint8)
    receive = to_all or dist.get_rank() == 0
    received = [torch.empty(size, dtype=torch.uint8) for size in sizes] if receive else None
    for start in range(0, max(sizes), GATHER_CHUNK):
        chunk = torch.zeros(min(GATHER_CHUNK, max(sizes) - start), dtype=torch.uint8, device=_comm_device)
        piece = mine[start : start + len(chunk)]
        chunk[: len(piece)] = piece.to(_comm_device)
        parts = [torch.empty_like(chunk) for _ in metas] if receive else None
        if to_all:
            dist.all_gather(parts, chunk)
        else:
            dist.gather(chunk, parts, dst=0)
        for whole, part in zip(received or [], parts or []):
            span = whole[start : start + len(chunk)]
            span.copy_(part[: len(span)])
    if not receive:
        return None
    pieces = [whole.view(m[1]).reshape(m[0]) for whole, m in zip(received, metas) if m is not None]
    out = torch.cat(pieces)
    return out.numpy() if next(m for m in metas if m is not None)[2] else out


def gather_objects(obj: Any) -> list[Any] | None:
    """Every process's picklable `obj` (small records, not tensors), in rank order, on rank 0; None on the others.
    One process: [obj]."""
    dist = _group()
    if dist is None:
        return [obj]
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, obj)  # gather_object is not implemented on every backend: all_gather is
    return found if dist.get_rank() == 0 else None


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its sum over the processes (one collective for all of them). One process: unchanged."""
    dist = _group()
    if dist is None or not tensors:
        return
    import torch

    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(_comm_device)
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@contextlib.contextmanager
def main_run(stage: str, params: Any) -> Iterator[Any]:
    """tracking.start_run on rank 0, tracking.UntrackedRun on the other processes: one MLflow run per job."""
    from d2dprompt.core.runtime.tracking import UntrackedRun, start_run

    if not is_main():
        yield UntrackedRun()
        return
    with start_run(stage, params) as log:
        yield log
