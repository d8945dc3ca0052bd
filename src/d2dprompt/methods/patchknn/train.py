"""train@patchknn (python -m d2dprompt.pipeline.train --method patchknn): nothing is optimised; each category of
`evaluate.datasets` gets its memory of normal patch features.

A category's reference images are `fewshot.k` of its normal training images (split train, real), drawn by
(fewshot.seed, category) as D2D-Prompt's memory draws them; k 0 takes all of them (the full-shot PatchCore setting).
Their patch features (model.py) form the memory; above `fewshot.memory_mb` a PatchCore coreset of that size is kept.
Each finished category is checkpointed (`<checkpoint>/<index>/`): a killed run keeps the finished ones and redoes the
rest, the same bits as an uninterrupted run. With `fewshot.mutual` no memory is kept: evaluate scores a category's
test images against each other.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from d2dprompt.core.data.latent_store import category_key, is_normal_training, read_index, read_latents
from d2dprompt.core.models import pick_device
from d2dprompt.core.runtime.checkpoints import TrainState, code_digest, fingerprint, save_state
from d2dprompt.core.training import resume, write_trained
from d2dprompt.methods.base import TrainJob, config_record
from d2dprompt.methods.patch_memory import draw_references, within_budget
from d2dprompt.methods.patchknn.model import LAYER, patch_features

if TYPE_CHECKING:
    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.base import Method


def reference_inputs(cfg: CoreParams, job: TrainJob, dataset: str, kind: str) -> dict[str, tuple[list[str], object]]:
    """'<dataset>/<category>' -> (its reference images' paths, a function giving their inputs: stored latents or
    [0, 1] pixels at model.image_size)."""
    from d2dprompt.core.data.row_images import RowImages

    if kind == "latents":
        stored, rows = read_latents(job.latents / dataset)
        load = lambda idx: stored["latents"][idx]  # noqa: E731
    else:
        rows = read_index(job.latents / dataset)
        images = RowImages([job.downloads / dataset] * len(rows), rows, cfg.latents, cfg.model.image_size, cfg.model.image_size)
        load = lambda idx: images.batch(idx)[0]  # noqa: E731
    out = {}
    for category in sorted({r.category for r in rows}):
        name = category_key(dataset, category)
        normal = [i for i, r in enumerate(rows) if r.category == category and is_normal_training(r)]
        if not normal:
            raise ValueError(f"{job.latents / dataset}: {category} has no normal training image")
        picked = [] if cfg.fewshot.mutual else draw_references(normal, cfg.fewshot.k, cfg.fewshot.seed, name)
        out[name] = ([rows[i].image_path for i in picked], lambda picked=picked: load(picked))
    return out


def category_memory(inputs: torch.Tensor, cfg: CoreParams, device: torch.device) -> torch.Tensor:
    """The (rows, D) memory of one category's reference inputs, a coreset when over fewshot.memory_mb."""
    knn, batch = cfg.patchknn, cfg.evaluate.batch_size
    parts = [patch_features(inputs[i : i + batch].to(device), knn.features, knn.neighbourhood, knn.patch)[0].flatten(0, 1).cpu()
             for i in range(0, len(inputs), batch)]
    return within_budget({LAYER: torch.cat(parts).to(device)}, cfg.fewshot.memory_mb, cfg.fewshot.seed)[LAYER].cpu()


def run(method: Method, cfg: CoreParams, job: TrainJob) -> list[dict[str, float]]:
    from tqdm import tqdm

    device = pick_device(cfg.model.device)
    kind = cfg.patchknn.features
    groups = {name: refs for dataset in cfg.evaluate.datasets for name, refs in reference_inputs(cfg, job, dataset, kind).items()}
    base = config_record(method, cfg, categories=list(groups))
    run_id = fingerprint(base, [job.latents / name / "index.csv" for name in cfg.evaluate.datasets], job.code if job.code is not None else code_digest())
    memories: dict[str, torch.Tensor] = {}
    for index, (name, (paths, inputs)) in enumerate(tqdm(groups.items(), desc="patchknn memories", unit="category")):
        folder = job.checkpoint / f"{index:03d}"
        state = resume(folder, run_id, lambda _: None)
        if state is not None:
            job.echo(f"patchknn {name}: memory resumed from {folder}")
            memories[name] = state.weights["memory"]
            continue
        if cfg.fewshot.mutual:  # the test images are each other's memory: nothing to keep
            continue
        memories[name] = category_memory(inputs(), cfg, device)
        save_state(TrainState(run_id, {"memory": memories[name]}, {"state": {}, "param_groups": []}), folder)
        job.echo(f"patchknn {name}: {len(paths)} reference images, memory {tuple(memories[name].shape)}")
    record = {**base, "references": {name: paths for name, (paths, _) in groups.items()},
              "memory_shapes": {name: list(m.shape) for name, m in memories.items()}}
    write_trained(job.out, memories, record, [])
    shutil.rmtree(job.checkpoint, ignore_errors=True)
    return []
