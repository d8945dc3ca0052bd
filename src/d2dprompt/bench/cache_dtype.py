"""python -m d2dprompt.bench.cache_dtype [--params params.yaml] [--latents stages/latents] [--queries stages/queries]

What `attention.cache_dtype: int8` costs against float16 on a float16 query cache the queries stage wrote: the bytes
per training row in each form, and how far the anomaly maps move when the same rows' queries are read back from int8
at the prompts the cache was computed with (the queries stage's initial prompts, so the difference is the
quantisation's alone). What it does to a trained run is `dvc exp run -S attention.cache_dtype=int8` and
`dvc metrics diff` (BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import typer

from d2dprompt.core.runtime.cli import app_for

BATCH = 16  # rows per forward: memory, not results


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file the cache was computed with"),
    latents: Path = typer.Option(Path("stages/latents"), help="latents stage output (the training rows' latent size)"),
    queries: Path = typer.Option(Path("stages/queries"), help="a float16 queries stage output"),
) -> None:
    import torch
    from safetensors.torch import load_file

    from d2dprompt.core.data.latent_store import training_set
    from d2dprompt.core.models import load_frozen
    from d2dprompt.methods.d2dprompt.model import build_segmenter
    from d2dprompt.methods.d2dprompt.query_cache import QUERIES_FILE, QueryCache, quantised
    from d2dprompt.params import load_params

    cfg = load_params(params)
    tensors = load_file(queries / QUERIES_FILE)
    if any(t.dtype != torch.float16 for t in tensors.values()):
        raise typer.BadParameter(f"{queries / QUERIES_FILE}: not float16; run the queries stage with attention.cache_dtype=float16")
    sd = load_frozen(cfg.model.pretrained, cfg.model.tiny_seed)
    torch.manual_seed(cfg.train.seed)  # the queries stage's initial prompts
    segmenter = build_segmenter(sd, cfg.prompt, cfg.attention, cfg.model).eval()
    held = QueryCache(tensors)
    as_int8 = QueryCache({f"{name}{suffix}": t for name, q in tensors.items() for suffix, t in quantised(q).items()})
    rows = next(iter(tensors.values())).shape[0]
    side = training_set(latents, cfg.train.datasets, cfg.train.supervision)[0].shape[-1]
    differences, values = [], []
    with torch.no_grad():
        for start in range(0, rows, BATCH):
            chosen = torch.arange(start, min(rows, start + BATCH))
            exact = segmenter.forward_cached(held.batch(chosen, torch.device("cpu")), (side, side))["anomaly"]
            read = segmenter.forward_cached(as_int8.batch(chosen, torch.device("cpu")), (side, side))["anomaly"]
            differences.append((exact - read).abs().flatten())
            values.append(exact.flatten())
    difference, value = torch.cat(differences), torch.cat(values)
    spread = float(value.max() - value.min())
    typer.echo(f"rows {rows}; MiB per row: float16 {held.nbytes / rows / 2**20:.3f}, int8 {as_int8.nbytes / rows / 2**20:.3f}")
    typer.echo(f"anomaly maps at the cache's prompts: range {float(value.min()):.4f}..{float(value.max()):.4f}; |float16 - int8| "
               f"mean {float(difference.mean()):.2e} ({float(difference.mean()) / spread:.2%} of the range), max {float(difference.max()):.2e}")


if __name__ == "__main__":
    app_for(main, __doc__)()
