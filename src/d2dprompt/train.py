"""python -m d2dprompt.train [--method d2dprompt] [--params params.yaml] [--latents stages/latents] [--out stages/train/<method>]

One entry per method of params.yaml's `methods` (dvc.yaml: train@<method>). `d2dprompt` (below) and
`anomalyclip` (train_anomalyclip.py) learn prompts; `draem` (train_draem.py) trains its networks from
scratch per category, `decodiff` (train_decodiff.py) a latent diffusion UNet from scratch; `d2d` learns nothing: its entry writes the fixed prompt record (d2d block) and an
empty parameter file, so evaluate reads every method the same way.

D2D-Prompt trains only the prompt vectors (AnomalyCLIP-style context + deep compound prompts) so the frozen UNet's
cross-attention maps segment defects. Supervision (`train.supervision`): `synthetic` = the latents
stage's Perlin anomalies plus the normal training images of `train.datasets`; `annotated` = the real
defects and masks of the test split of auxiliary datasets (the zero-shot protocol: train on VisA,
evaluate on MVTec AD, and vice versa). Writes `model.safetensors` (prompt parameters only),
`model.json` (the config that produced them) and `history.csv` (per-epoch losses). A checkpoint per
epoch (safetensors + JSON, see checkpoints.py) lets an interrupted run resume with the same params,
data and code, bit for bit as if it had not stopped: in cached mode the prompts of the last query
refresh are kept, so the resumed epochs read the same queries. A finished run deletes its checkpoint.

Under torchrun (dvc.yaml, distributed.nproc > 1) d2dprompt trains data-parallel: each seeded batch is split
across the processes, each computes its rows' share of the batch loss (losses.shard_loss), the prompt
gradients are summed over the processes and every process takes the same Adam step, so the batches and the
result do not depend on the number of processes (up to float rounding). Rank 0 alone writes the outputs and
checkpoints and logs to MLflow; d2d's fixed prompts are written by rank 0, and the methods trained from
scratch or on pixels (anomalyclip, draem, decodiff) run on one process only.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from d2dprompt import distributed
from d2dprompt.config import FROM_SCRATCH, Params, ParamsError, flatten, load_params
from d2dprompt.cli import app_for
from d2dprompt.images import ImageError
from d2dprompt.outputs import atomic_file, write_json

if TYPE_CHECKING:  # torch and the models load when a command runs, not for --help
    import torch

    from d2dprompt.methods.d2dprompt import D2DSegmenter
    from d2dprompt.query_cache import QueryCache

HISTORY_FILE = "history.csv"
LOSSES_FILE = "losses.csv"  # history.csv in long form, for the per-term training plot
MULTI_PROCESS = ("d2dprompt", "d2d")  # the methods whose train entry runs on several processes (distributed.py)


@dataclass
class Batches:
    """The training rows, held once on the CPU: latents, latent-size masks, labels, fixed noise, keys."""

    latents: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor
    keys: list[str]


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
    """One epoch of Adam steps, every method alike: `loss_of(batch)` -> (loss, its terms); returns per-row means.
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


def train_epoch(
    segmenter: D2DSegmenter,
    optimizer: torch.optim.Optimizer,
    data: Batches,
    cfg: Params,
    epoch: int,
    device: torch.device,
    queries: QueryCache | None = None,
) -> dict[str, float]:
    """One pass over the rows in a seeded order; full mode runs the UNet, cached mode reads `queries`.
    With several processes each computes its share of every batch and the gradients are summed."""
    from d2dprompt.losses import LOSS_NAMES, shard_loss, total_loss
    from d2dprompt.models import autocast

    weights = {name: getattr(cfg.loss, name) for name in LOSS_NAMES}
    latent_hw = tuple(data.latents.shape[-2:])

    def maps_of(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device, cfg.model.precision):
            if queries is None:
                maps = segmenter(data.latents[rows].to(device), data.noise[rows].to(device))
            else:
                maps = segmenter.forward_cached(queries.batch(rows, device), latent_hw)
        return {k: v.float() for k, v in maps.items()}

    def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return total_loss(maps_of(batch), data.masks[batch].to(device), data.labels[batch].to(device), weights, cfg.loss.focal_gamma, cfg.loss.image_top_percent)

    def share_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # this process's rows of the batch
        part = distributed.shard(len(batch))
        rows = batch[part.start : part.stop]
        if not len(rows):  # more processes than rows: nothing to add but zeros
            return sum(p.sum() for p in segmenter.prompts.parameters()) * 0, {k: 0.0 for k, w in weights.items() if w}
        return shard_loss(maps_of(rows), data.masks[rows].to(device), data.labels[rows].to(device), weights, cfg.loss.focal_gamma,
                          cfg.loss.image_top_percent, data.labels[batch])

    batches = epoch_batches(len(data.keys), cfg.train.batch_size, cfg.train.seed, epoch)
    desc = f"epoch {epoch + 1}/{cfg.train.epochs}"
    if distributed.world_size() == 1:
        return optimise(batches, loss_of, optimizer, desc)
    return optimise(batches, share_of, optimizer, desc, summed_over_processes(list(segmenter.prompts.parameters())))


def summed_over_processes(parameters: list[torch.Tensor]) -> Callable[[dict[str, float]], dict[str, float]]:
    """optimise's `sync` for data-parallel training: each process's gradients and loss shares summed over the
    processes, so every process takes the step of the whole batch (one Adam, the same on each)."""
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


def cache_drift(segmenter: D2DSegmenter, data: Batches, queries: QueryCache, device: torch.device, rows: int = 32) -> float:
    """Mean |full - cached| anomaly map over the first `rows` training rows: how stale the cache is."""
    import torch

    idx = torch.arange(min(rows, len(data.keys)))
    with torch.no_grad():
        full = segmenter(data.latents[idx].to(device), data.noise[idx].to(device))["anomaly"]
        cached = segmenter.forward_cached(queries.batch(idx, device), tuple(data.latents.shape[-2:]))["anomaly"]
    return float((full.float() - cached.float()).abs().mean())


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


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def refreshed_queries(segmenter: D2DSegmenter, prompts: dict[str, torch.Tensor], data: Batches, cfg: Params, device: torch.device) -> QueryCache:
    """The query cache as computed with `prompts`; the segmenter's own prompts are left as they were."""
    from d2dprompt.query_cache import QueryCache, compute_queries_shared

    current = _clone(segmenter.prompts.state_dict())
    segmenter.prompts.load_state_dict(prompts)
    try:  # shared out over the processes (every one needs every row)
        return QueryCache(compute_queries_shared(segmenter, data.latents, data.noise, cfg.train.batch_size, device, "re-cache", to_all=True))
    finally:
        segmenter.prompts.load_state_dict(current)


def write_fixed(cfg: Params, out: Path) -> list[dict[str, float]]:
    """d2d: nothing to learn; the record of its fixed sentences and an empty parameter file."""
    from safetensors.torch import save_file

    from d2dprompt.prompt_files import CONFIG_FILE, WEIGHTS_FILE, config_record

    if not distributed.is_main():  # several processes: rank 0 writes
        return []
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / WEIGHTS_FILE) as tmp:
        save_file({}, tmp)
    write_json(out / CONFIG_FILE, config_record(cfg, "d2d"))
    write_history([], out / HISTORY_FILE)  # no epochs: a header only, so every train entry has the same outputs
    typer.echo(f"d2d: fixed prompts {cfg.d2d.normal_prompt!r} / {cfg.d2d.abnormal_prompt!r}, nothing to train")
    return []


def run(cfg: Params, latents_root: Path, queries_root: Path, out: Path, checkpoint: Path, log=None, code: str | None = None) -> list[dict[str, float]]:
    """Train D2D-Prompt (resuming from a matching checkpoint) and write the outputs; returns the per-epoch history."""
    import torch

    from d2dprompt.checkpoints import TrainState, code_digest, fingerprint, load_state, save_state
    from d2dprompt.latent_store import training_set
    from d2dprompt.methods.d2dprompt import build_segmenter, fixed_noise
    from d2dprompt.models import load_frozen
    from d2dprompt.prompt_files import config_record, save_prompts
    from d2dprompt.query_cache import open_queries

    device = distributed.device(cfg.model.device)
    main = distributed.is_main()  # with several processes, rank 0 alone writes, prints and logs
    echo = typer.echo if main else (lambda _: None)
    record = config_record(cfg, "d2dprompt")
    data_files = [latents_root / name / "latents.safetensors" for name in cfg.train.datasets]
    run_id = fingerprint(record, data_files, code if code is not None else code_digest())
    latents, masks, labels, keys = training_set(latents_root, cfg.train.datasets, cfg.train.supervision)
    noise = fixed_noise(len(keys), tuple(latents.shape[1:]), cfg.model.noise_seed)  # once, off the hot path
    if device.type == "cuda":  # the training rows fit on the GPU (MVTec AD at 512 px: ~0.7 GB): no loader to wait for
        latents, masks, labels, noise = (t.to(device) for t in (latents, masks, labels, noise))
    data = Batches(latents, masks, labels, noise, keys)
    queries = open_queries(queries_root, keys) if cfg.attention.mode == "cached" else None
    sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed).to(device)
    torch.manual_seed(cfg.train.seed)
    segmenter = build_segmenter(sd, cfg.prompt, cfg.attention, cfg.model).to(device)
    optimizer = torch.optim.Adam(segmenter.prompts.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    history: list[dict[str, float]] = []
    refresh: dict[str, torch.Tensor] | None = None
    state = load_state(checkpoint)
    if state is not None and state.fingerprint == run_id:
        segmenter.prompts.load_state_dict(state.prompts)
        optimizer.load_state_dict(state.optimizer)
        history, refresh = state.history, state.refresh_prompts
        if queries is not None and refresh is not None:
            queries = refreshed_queries(segmenter, refresh, data, cfg, device)
        echo(f"resuming after epoch {len(history)} from {checkpoint}")
    elif state is not None:
        echo(f"{checkpoint}: left by a run with other params, data or code; training from scratch")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.train.untrained:  # the baseline: prompts as initialised; model.json records train.untrained: true
        echo("train.untrained: true: writing the initial prompts without optimising them")
    for epoch in range(len(history), 0 if cfg.train.untrained else cfg.train.epochs):
        every = cfg.attention.recache_every
        if queries is not None and every and epoch and epoch % every == 0:
            refresh = _clone(segmenter.prompts.state_dict())
            queries = refreshed_queries(segmenter, refresh, data, cfg, device)
        losses = train_epoch(segmenter, optimizer, data, cfg, epoch, device, queries)
        if queries is not None and main:  # logged only: rank 0 measures it while the others go on
            losses["cache_drift"] = cache_drift(segmenter, data, queries, device)
        history.append({"epoch": epoch + 1, **losses})
        if not main:
            continue
        save_state(TrainState(run_id, segmenter.prompts.state_dict(), optimizer.state_dict(), history, refresh), checkpoint)
        typer.echo(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        if log is not None:
            log.log_metrics({f"loss_{k}": v for k, v in losses.items()}, step=epoch + 1)
    if main:
        save_prompts(segmenter, record, out)
        write_history(history, out / HISTORY_FILE)
        shutil.rmtree(checkpoint, ignore_errors=True)  # finished: nothing for a later run to pick up
    distributed.barrier()  # every process leaves with the outputs written
    return history


def main(
    method: str = typer.Option("d2dprompt", help="one of params.yaml's methods: d2dprompt | d2d | anomalyclip | draem | decodiff"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    latents: Path = typer.Option(Path("stages/latents"), help="latents stage output"),
    downloads: Path = typer.Option(Path("stages/download"), help="download stage output (methods that read pixels)"),
    queries: Path = typer.Option(Path("stages/queries"), help="queries stage output (d2dprompt, cached mode)"),
    out: Optional[Path] = typer.Option(None, help="where prompts and history go [default: stages/train/<method>]"),
    checkpoint: Optional[Path] = typer.Option(
        None, help="per-epoch state folder, not a DVC output, so DVC never deletes it before a rerun [default: stages/checkpoints/train/<method>]"
    ),
) -> None:
    from d2dprompt.checkpoints import CheckpointError
    from d2dprompt.prompt_files import CONFIG_FILE

    try:
        cfg = load_params(params)
        if method not in cfg.methods:
            raise ParamsError(f"{params}: methods: {method!r} is not listed ({' | '.join(cfg.methods)})")
        out = out or Path("stages/train") / method
        checkpoint = checkpoint or Path("stages/checkpoints/train") / method
        if distributed.launched_processes() > 1 and method not in MULTI_PROCESS:
            raise ValueError(f"train@{method}: only {' and '.join(MULTI_PROCESS)} train on several processes; "
                             f"train {method} on one (distributed.nproc: 1, or python -m d2dprompt.train)")
        with distributed.process_group(cfg.distributed, cfg.model.device), distributed.main_run("train", {**flatten(cfg), "method": method}) as log:
            if method == "d2d":
                write_fixed(cfg, out)
            elif method == "draem":
                from d2dprompt.train_draem import run as run_draem

                run_draem(cfg, latents, downloads, out, log)
            elif method == "decodiff":
                from d2dprompt.train_decodiff import run as run_decodiff

                run_decodiff(cfg, latents, out, checkpoint, log)
            elif method == "anomalyclip":
                from d2dprompt.train_anomalyclip import run as run_anomalyclip

                run_anomalyclip(cfg, latents, downloads, out, checkpoint, log)
            else:
                run(cfg, latents, queries, out, checkpoint, log)
            for name in cfg.evaluate.datasets if method in FROM_SCRATCH else cfg.train.datasets:  # what it learned from
                log.log_dataset(name, latents / name / "index.csv", "training")
            log.log_artifact(out / CONFIG_FILE)
            log.log_detector(out, params)  # the MLflow model `detector`: the weights, the params, the code that scores images
    except (ParamsError, CheckpointError, ImageError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app_for(main, __doc__)()
