"""The training loop every method shares, and what a train entry writes. Pure orchestration of torch: no method here.

- `epoch_batches`: the seeded batch order of an epoch, the same for a resumed run as for an uninterrupted one;
- `optimise`: one epoch of optimiser steps over `loss_of(batch)`, data-parallel when given a `sync`;
- `resume`: the one resume block: a checkpoint is taken up only when its fingerprint (params, data, code) matches;
- `write_trained` / `write_history`: model.safetensors + model.json, and history.csv + losses.csv beside them.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from d2dprompt.core.runtime import distributed
from d2dprompt.core.runtime.outputs import atomic_file, write_json

if TYPE_CHECKING:
    import torch

    from d2dprompt.core.runtime.checkpoints import TrainState

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "model.json"  # a trained run's folder (methods/trained.py reads it)
HISTORY_FILE = "history.csv"
LOSSES_FILE = "losses.csv"  # history.csv in long form, for the per-term training plot


def epoch_batches(rows: int, batch_size: int, seed: int, epoch: int) -> tuple[torch.Tensor, ...]:
    """Row indices in a seeded order, split into batches: the same for a resumed run as for an uninterrupted one."""
    import torch

    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).split(batch_size)


def optimise(
    batches: tuple[torch.Tensor, ...],
    loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    optimizer: torch.optim.Optimizer,
    desc: str,
    sync: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """One epoch of optimiser steps, every method alike: `loss_of(batch)` -> (loss, its terms); returns per-row means.
    Data-parallel, `sync(terms)` sums the gradients and the terms over the processes before each step."""
    from tqdm import tqdm

    sums: dict[str, float] = {}
    rows = sum(len(batch) for batch in batches)
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not distributed.is_main())
    for batch in bar:
        loss, values = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        values["total"] = float(loss.detach())
        if sync is not None:
            values = sync(values)
        optimizer.step()
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value * len(batch)
        bar.set_postfix(loss=f"{values['total']:.4f}")
    return {name: total / rows for name, total in sums.items()}


def summed_over_processes(parameters: list[torch.Tensor]) -> Callable[[dict[str, float]], dict[str, float]]:
    """optimise's `sync` for data-parallel training: each process's gradients and loss shares summed over the
    processes, so every process takes the step of the whole batch (one optimiser, the same on each)."""
    import torch

    def sync(values: dict[str, float]) -> dict[str, float]:
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum([p.grad for p in parameters])
        names = sorted(values)
        totals = torch.tensor([values[name] for name in names], dtype=torch.float64)
        distributed.all_reduce_sum([totals])
        return dict(zip(names, totals.tolist()))

    return sync


def resume(checkpoint: Path, run_id: str, echo: Callable[[str], None]) -> TrainState | None:
    """The checkpoint to resume from: the state in `checkpoint` when it was left by this very run (same params, data
    and code: `run_id`, checkpoints.fingerprint), else None (a stale one is said and ignored, then overwritten)."""
    from d2dprompt.core.runtime.checkpoints import load_state

    state = load_state(checkpoint)
    if state is not None and state.fingerprint == run_id:
        echo(f"resuming after epoch {len(state.history)} from {checkpoint}")
        return state
    if state is not None:
        echo(f"{checkpoint}: left by a run with other params, data or code; training from scratch")
    return None


def write_trained(out: Path, weights: dict[str, torch.Tensor], record: dict, history: list[dict[str, float]]) -> None:
    """A trained run's folder: the learned tensors, the record that rebuilds the model, the per-epoch history."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp)
    write_json(out / CONFIG_FILE, record)
    write_history(history, out / HISTORY_FILE)


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """`path` (history.csv): one row per epoch, one column per loss term; beside it LOSSES_FILE, the same
    numbers one row per (epoch, term), which the training plot draws as one line per term."""
    names = ["epoch"] + sorted({k for row in history for k in row if k != "epoch"})
    with atomic_file(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
    with atomic_file(path.with_name(LOSSES_FILE)) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "term", "loss"])
        writer.writerows((row["epoch"], name, row[name]) for row in history for name in names[1:] if name in row)
