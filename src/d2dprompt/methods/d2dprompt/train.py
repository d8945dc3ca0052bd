"""D2D-Prompt's training (train@d2dprompt): only the prompt vectors learn (AnomalyCLIP-style context + deep compound
prompts), so the frozen UNet's cross-attention maps segment defects.

Supervision (`train.supervision`): `synthetic` = the latents stage's Perlin anomalies plus the normal training images
of `train.datasets`; `annotated` = the real defects and masks of the test split of auxiliary datasets (the zero-shot
protocol: train on VisA, evaluate on MVTec AD, and vice versa). `attention.mode: full` runs the UNet every step,
`cached` reads the queries stage's cache (query_cache.py), refreshed every `attention.recache_every` epochs. A
checkpoint per epoch lets an interrupted run resume bit for bit: in cached mode the prompts of the last query refresh
are kept, so the resumed epochs read the same queries. Under torchrun each seeded batch is split across the
processes (loss.shard_loss), the prompt gradients are summed and every process takes the same Adam step, so the
result does not depend on the number of processes; rank 0 alone writes, checkpoints and logs.

The few-shot memory (`fewshot`) is built from the trained prompts after the last epoch, and the prompts are not a
function of it: the checkpoint's fingerprint leaves `fewshot` out and the finished checkpoint stays, so a run that
changes only `fewshot` (DVC reruns train@d2dprompt for it) resumes with every epoch done and builds the memory alone.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path  # noqa: F401  (annotations)
from typing import TYPE_CHECKING

from d2dprompt.core.runtime import distributed
from d2dprompt.core.training import epoch_batches, optimise, resume, summed_over_processes, write_trained
from d2dprompt.methods.base import TrainJob, config_record

if TYPE_CHECKING:
    import torch

    from d2dprompt.core.runtime.config import CoreParams as Params
    from d2dprompt.methods.base import Method
    from d2dprompt.methods.d2dprompt.model import D2DSegmenter
    from d2dprompt.methods.d2dprompt.query_cache import QueryCache


@dataclass
class Batches:
    """The training rows, held once on the CPU: latents, latent-size masks, labels, fixed noise, keys."""

    latents: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor
    keys: list[str]


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
    from d2dprompt.methods.d2dprompt.loss import LOSS_NAMES, shard_loss, total_loss
    from d2dprompt.core.models import autocast

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
    if queries is not None:  # a streamed cache reads each process's rows of the coming batches ahead of the steps
        queries.prefetch([b[(part := distributed.shard(len(b))).start : part.stop] for b in batches])
    desc = f"epoch {epoch + 1}/{cfg.train.epochs}"
    if distributed.world_size() == 1:
        return optimise(batches, loss_of, optimizer, desc)
    return optimise(batches, share_of, optimizer, desc, summed_over_processes(list(segmenter.prompts.parameters())))


def cache_drift(segmenter: D2DSegmenter, data: Batches, queries: QueryCache, device: torch.device, rows: int = 32) -> float:
    """Mean |full - cached| anomaly map over the first `rows` training rows: how stale the cache is."""
    import torch

    idx = torch.arange(min(rows, len(data.keys)))
    with torch.no_grad():
        full = segmenter(data.latents[idx].to(device), data.noise[idx].to(device))["anomaly"]
        cached = segmenter.forward_cached(queries.batch(idx, device), tuple(data.latents.shape[-2:]))["anomaly"]
    return float((full.float() - cached.float()).abs().mean())


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


RESIDENT_SHARE = 4  # attention.cache_resident_gb=auto: at most 1/4 of the device's memory, the rest for the model and data


def resident_budget(setting: float | str, device: torch.device) -> int:
    """Bytes of query cache read whole onto `device` (attention.cache_resident_gb); auto = a quarter of its memory."""
    if setting != "auto":
        return int(setting * 2**30)
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory // RESIDENT_SHARE
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // RESIDENT_SHARE


def placed(queries: QueryCache, cfg: Params, device: torch.device) -> QueryCache:
    """`queries` read whole onto the training device when they fit attention.cache_resident_gb, else streamed."""
    return queries.resident(device) if queries.nbytes <= resident_budget(cfg.attention.cache_resident_gb, device) else queries


def refreshed_queries(segmenter: D2DSegmenter, prompts: dict[str, torch.Tensor], data: Batches, cfg: Params, device: torch.device,
                      scratch: Path) -> QueryCache:
    """The query cache as computed with `prompts`; the segmenter's own prompts are left as they were. One process
    writes it batch by batch to a file in `scratch` (memory holds a batch; `placed` reads it whole when it fits
    attention.cache_resident_gb); several share the rows out and each holds them all."""
    from d2dprompt.methods.d2dprompt.query_cache import QUERIES_FILE, QueryCache, compute_queries_shared, write_queries

    current = _clone(segmenter.prompts.state_dict())
    segmenter.prompts.load_state_dict(prompts)
    try:
        if distributed.world_size() == 1:
            scratch.mkdir(parents=True, exist_ok=True)
            path = scratch / f"refreshed-{QUERIES_FILE}"
            path.unlink(missing_ok=True)  # the previous refresh's file: a cache still reading it keeps its inode
            write_queries(segmenter, data.latents, data.noise, cfg.train.batch_size, device, path, "re-cache", cfg.attention.cache_dtype)
            return placed(QueryCache(path=path), cfg, device)
        fresh = QueryCache(compute_queries_shared(segmenter, data.latents, data.noise, cfg.train.batch_size, device, "re-cache", to_all=True,
                                                  dtype=cfg.attention.cache_dtype))
        return placed(fresh, cfg, device)
    finally:
        segmenter.prompts.load_state_dict(current)


def run(method: Method, cfg: Params, job: TrainJob) -> list[dict[str, float]]:
    """Train D2D-Prompt (resuming from a matching checkpoint) and write the outputs; returns the per-epoch history."""
    import torch

    from d2dprompt.core.data.latent_store import training_set
    from d2dprompt.core.models import load_frozen
    from d2dprompt.core.runtime.checkpoints import TrainState, code_digest, fingerprint, save_state
    from d2dprompt.methods.d2dprompt.model import build_segmenter, fixed_noise
    from d2dprompt.methods.d2dprompt.query_cache import open_queries

    device = distributed.device(cfg.model.device)
    main = distributed.is_main()  # with several processes, rank 0 alone writes, prints and logs
    echo = job.echo if main else (lambda _: None)
    record = config_record(method, cfg)
    data_files = [job.latents / name / "latents.safetensors" for name in cfg.train.datasets]
    prompts_record = {block: values for block, values in record.items() if block != "fewshot"}  # the memory comes after
    run_id = fingerprint(prompts_record, data_files, job.code if job.code is not None else code_digest())
    latents, masks, labels, keys = training_set(job.latents, cfg.train.datasets, cfg.train.supervision)
    noise = fixed_noise(len(keys), tuple(latents.shape[1:]), cfg.model.noise_seed)  # once, off the hot path
    if device.type == "cuda":  # the training rows fit on the GPU (MVTec AD at 512 px: ~0.7 GB): no loader to wait for
        latents, masks, labels, noise = (t.to(device) for t in (latents, masks, labels, noise))
    data = Batches(latents, masks, labels, noise, keys)
    queries = placed(open_queries(job.queries, keys), cfg, device) if cfg.attention.mode == "cached" else None
    sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed)
    torch.manual_seed(cfg.train.seed)
    segmenter = method.place(build_segmenter(sd, cfg.prompt, cfg.attention, cfg.model), device)
    optimizer = torch.optim.Adam(segmenter.prompts.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    history: list[dict[str, float]] = []
    refresh: dict[str, torch.Tensor] | None = None
    scratch = job.checkpoint.with_name(job.checkpoint.name + "-queries")  # refreshed caches; each epoch's checkpoint replaces its folder
    state = resume(job.checkpoint, run_id, echo)
    if state is not None:
        segmenter.prompts.load_state_dict(state.weights)
        optimizer.load_state_dict(state.optimizer)
        history, refresh = state.history, state.refresh_prompts
        if len(history) >= cfg.train.epochs:
            echo(f"{job.checkpoint}: the prompts are trained with these params, data and code; only the few-shot memory is built")
        elif queries is not None and refresh is not None:
            queries = refreshed_queries(segmenter, refresh, data, cfg, device, scratch)
    if cfg.train.untrained:  # the baseline: prompts as initialised; model.json records train.untrained: true
        echo("train.untrained: true: writing the initial prompts without optimising them")
    for epoch in range(len(history), 0 if cfg.train.untrained else cfg.train.epochs):
        every = cfg.attention.recache_every
        if queries is not None and every and epoch and epoch % every == 0:
            refresh = _clone(segmenter.prompts.state_dict())
            queries = refreshed_queries(segmenter, refresh, data, cfg, device, scratch)
        losses = train_epoch(segmenter, optimizer, data, cfg, epoch, device, queries)
        if queries is not None and main:  # logged only: rank 0 measures it while the others go on
            losses["cache_drift"] = cache_drift(segmenter, data, queries, device)
        history.append({"epoch": epoch + 1, **losses})
        if not main:
            continue
        save_state(TrainState(run_id, segmenter.prompts.state_dict(), optimizer.state_dict(), history, refresh), job.checkpoint)
        echo(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        if job.log is not None:
            job.log.log_metrics({f"loss_{k}": v for k, v in losses.items()}, step=epoch + 1)
    if main:
        weights = segmenter.prompts.state_dict()
        if cfg.fewshot.k or cfg.fewshot.mutual:  # few-shot: the memory of the trained prompts' UNet features (memory.py)
            from d2dprompt.methods.d2dprompt.memory import build_memory

            tensors, record["memory"] = build_memory(segmenter.eval(), cfg, job.latents, device, echo)
            record["categories"] = list(record["memory"])  # predict, Detector and the app then ask which one an image is
            weights = {**weights, **tensors}
        write_trained(job.out, weights, record, history)
        shutil.rmtree(scratch, ignore_errors=True)  # the finished checkpoint stays: a fewshot change resumes from it
    distributed.barrier()  # every process leaves with the outputs written
    return history
