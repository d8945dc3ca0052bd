"""Processes of a 2-process gloo group for tests/test_distributed.py, started by torch.multiprocessing.

A module of their own so a spawned process imports torch and d2dprompt.core.runtime.distributed only, not the
test fixtures (conftest imports diffusers: seconds per process).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d2dprompt.core.runtime import distributed
from d2dprompt.core.runtime.config import DistributedParams


def join(rank: int, world: int, port: int, timeout_s: int = 60):
    """The environment torchrun gives its processes, then the stages' own way in."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return distributed.process_group(DistributedParams(timeout_s=timeout_s), "cpu")


def collectives(rank: int, world: int, port: int) -> None:
    """Every helper on real collectives; an assertion failing in either process fails the spawning test."""
    with join(rank, world, port):
        assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (world, rank, rank == 0)
        # unequal shards (7 rows: 4 + 3) of a numpy array come back whole, in order, on rank 0 only
        rows = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
        part = distributed.shard(7)
        assert len(part) == (4, 3)[rank]
        gathered = distributed.gather(rows[part.start : part.stop])
        assert np.array_equal(gathered, rows) if rank == 0 else gathered is None
        # the same in rounds of 7 bytes: chunks that split values, shards of unequal byte counts
        distributed.GATHER_CHUNK = 7
        gathered = distributed.gather(rows[part.start : part.stop], to_all=True)
        distributed.GATHER_CHUNK = 64 * 2**20
        assert np.array_equal(gathered, rows)
        # whole blocks (10 rows in blocks of 4: 8 + 2), a tensor in fp16, on every process
        latents = torch.randn(10, 2, 3, generator=torch.Generator().manual_seed(0)).half()
        part = distributed.shard(10, block=4)
        assert (part.start, part.stop) == ((0, 8), (8, 10))[rank]
        assert torch.equal(distributed.gather(latents[part.start : part.stop], to_all=True), latents)
        # a process with no rows (None), bools kept
        masks = np.array([[True, False, True]])
        both = distributed.gather(masks if rank == 1 else None, to_all=True)
        assert both.dtype == bool and np.array_equal(both, masks)
        assert distributed.gather(None, to_all=True) is None
        # sums in place, one collective for tensors of several dtypes
        grads, terms = torch.full((2, 2), rank + 1.0), torch.tensor([rank, 0.5], dtype=torch.float64)
        distributed.all_reduce_sum([grads, terms])
        assert torch.equal(grads, torch.full((2, 2), 3.0)) and terms.tolist() == [1.0, 1.0]
        # small records: every process's, in rank order, on rank 0 only
        records = distributed.gather_objects({"rank": rank, "keys": ["a"] * rank})
        assert records == [{"rank": 0, "keys": []}, {"rank": 1, "keys": ["a"]}] if rank == 0 else records is None
        distributed.barrier()
    assert distributed.gather_objects("alone") == ["alone"]
    assert distributed.world_size() == 1 and distributed.is_main()  # the group is left at the end of the `with`


def one_fails(rank: int, world: int, port: int, report: str) -> None:
    """Rank 1 fails inside the group; rank 0, waiting on it in a collective, must stop with an error, not hang."""
    with join(rank, world, port, timeout_s=30):
        if rank == 1:
            raise ValueError("rank 1 cannot read its rows")
        start = time.monotonic()
        try:
            distributed.gather(np.zeros((1, 2)))
        except Exception as err:  # noqa: BLE001 - whatever gloo raises is the point
            Path(report).write_text(f"{type(err).__name__} after {time.monotonic() - start:.1f} s: {err}")
            sys.exit(1)
        Path(report).write_text("gather returned")
