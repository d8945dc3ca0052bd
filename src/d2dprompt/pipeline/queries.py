"""python -m d2dprompt.pipeline.queries [--params params.yaml] [--latents stages/latents] [--out stages/queries]

For `attention.mode: cached`: runs the frozen UNet once per training latent (no grad, fp16 stored) with
the reference prompts, i.e. the prompt learner exactly as training initialises it (`train.seed`), and
stores the queries of every captured cross-attention layer. Cached training then needs only the text
encoder, `to_k` and the softmax per step. With `attention.mode: full` it writes an empty cache. Under
torchrun (dvc.yaml, distributed.nproc) the processes share the rows and rank 0 writes the cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

from d2dprompt.core.runtime import distributed
from d2dprompt.core.runtime.config import ParamsError
from d2dprompt.params import Params, load_params
from d2dprompt.core.runtime.cli import app_for
from d2dprompt.core.runtime.outputs import atomic_dir


def cache_queries(cfg: Params, latents: Path, out: Path) -> str | None:
    """Write the query cache of `cfg`'s training rows to `out` (empty in full mode); returns a summary line.

    Under torchrun each process computes the queries of its share of the rows and rank 0 writes them all
    (returning the summary; the other processes return None)."""
    import torch  # torch and the models load when the command runs, not for --help

    from d2dprompt.core.data.latent_store import training_set
    from d2dprompt.methods.d2dprompt.model import build_segmenter, fixed_noise
    from d2dprompt.core.models import load_frozen
    from d2dprompt.methods.d2dprompt.query_cache import KEYS_FILE, QUERIES_FILE, compute_queries_shared, save_queries, write_queries

    data_latents, _, _, keys = training_set(latents, cfg.train.datasets, cfg.train.supervision)
    if cfg.attention.mode == "full":
        if distributed.is_main():
            with atomic_dir(out) as tmp:
                save_queries({}, [], tmp)
            return "attention.mode=full: no queries cached"
        return None
    device = distributed.device(cfg.model.device)
    sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed).to(device)
    torch.manual_seed(cfg.train.seed)  # the same initial prompts as the train stage
    segmenter = build_segmenter(sd, cfg.prompt, cfg.attention, cfg.model).to(device)
    noise = fixed_noise(len(keys), tuple(data_latents.shape[1:]), cfg.model.noise_seed)
    if distributed.world_size() == 1:  # one batch in memory at a time, written where it goes in the file
        with atomic_dir(out) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            shapes = write_queries(segmenter, data_latents, noise, cfg.train.batch_size, device, tmp / QUERIES_FILE, dtype=cfg.attention.cache_dtype)
            (tmp / KEYS_FILE).write_text("".join(f"{k}\n" for k in keys))  # the folder itself appears whole
        size = sum({"F16": 2, "I8": 1}[dtype] * math.prod(shape) for shape, dtype in shapes.values())
        return f"queries: {len(keys)} rows x {len(segmenter.captured)} layers ({cfg.attention.cache_dtype}), {size / len(keys) / 2**20:.2f} MiB per row"
    tensors = compute_queries_shared(segmenter, data_latents, noise, cfg.train.batch_size, device, dtype=cfg.attention.cache_dtype)
    if tensors is None:  # not rank 0: its rows went to rank 0, which writes them
        return None
    with atomic_dir(out) as tmp:
        save_queries(tensors, keys, tmp)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return f"queries: {len(keys)} rows x {len(segmenter.captured)} layers ({cfg.attention.cache_dtype}), {size / len(keys) / 2**20:.2f} MiB per row"


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    latents: Path = typer.Option(Path("stages/latents"), help="latents stage output"),
    out: Path = typer.Option(Path("stages/queries"), help="where the query cache goes"),
) -> None:
    try:
        cfg = load_params(params)
        with distributed.process_group(cfg.distributed, cfg.model.device):
            summary = cache_queries(cfg, latents, out)
        if summary is not None:
            typer.echo(summary)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app_for(main, __doc__)()
