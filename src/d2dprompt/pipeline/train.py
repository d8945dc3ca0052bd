"""python -m d2dprompt.pipeline.train [--method d2dprompt] [--params params.yaml] [--latents stages/latents] [--out stages/train/<method>]

Trains one method of params.yaml's `methods` (dvc.yaml: train@<method>) and writes its trained folder:
`model.safetensors` (what it learned), `model.json` (the params blocks that rebuild it), `history.csv` and
`losses.csv` (per-epoch losses). The method itself (methods/<name>/, reached through methods/registry.py) decides what
it reads and learns; this stage checks params, starts the processes and the MLflow run, and logs the trained folder
as the MLflow model `detector`. A checkpoint per epoch (stages/checkpoints/train/<method>/) lets a killed run resume
bit for bit with the same params, data and code; a finished run deletes it. Under torchrun (distributed.nproc > 1)
only methods that say they train data-parallel run; rank 0 alone writes, checkpoints and logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from d2dprompt.core.data.images import ImageError
from d2dprompt.core.runtime import distributed, numerics
from d2dprompt.core.runtime.cli import app_for
from d2dprompt.core.runtime.config import ParamsError, flatten
from d2dprompt.core.training import CONFIG_FILE
from d2dprompt.methods import registry
from d2dprompt.methods.base import TrainJob
from d2dprompt.params import load_params


def main(
    method: str = typer.Option("d2dprompt", help="one of params.yaml's methods (methods/registry.py lists those there are)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    latents: Path = typer.Option(Path("stages/latents"), help="latents stage output"),
    downloads: Path = typer.Option(Path("stages/download"), help="download stage output (methods that read pixels)"),
    queries: Path = typer.Option(Path("stages/queries"), help="queries stage output (d2dprompt, cached mode)"),
    out: Optional[Path] = typer.Option(None, help="where prompts and history go [default: stages/train/<method>]"),
    checkpoint: Optional[Path] = typer.Option(
        None, help="per-epoch state folder, not a DVC output, so DVC never deletes it before a rerun [default: stages/checkpoints/train/<method>]"
    ),
) -> None:
    from d2dprompt.core.runtime.checkpoints import CheckpointError

    try:
        cfg = load_params(params)
        if method not in cfg.methods:
            raise ParamsError(f"{params}: methods: {method!r} is not listed ({' | '.join(cfg.methods)})")
        chosen = registry.get(method)
        out = out or Path("stages/train") / method
        checkpoint = checkpoint or Path("stages/checkpoints/train") / method
        if distributed.launched_processes() > 1 and not chosen.multi_process:
            several = " and ".join(m.name for m in registry.methods() if m.multi_process)
            raise ValueError(f"train@{method}: only {several} train on several processes; "
                             f"train {method} on one (distributed.nproc: 1, or python -m d2dprompt.pipeline.train)")
        with distributed.process_group(cfg.distributed, cfg.model.device), distributed.main_run("train", {**flatten(cfg), "method": method}) as log:
            log.set_tags(numerics.machine_tags(str(distributed.device(cfg.model.device))))
            chosen.train(cfg, TrainJob(latents, downloads, queries, out, checkpoint, log, echo=typer.echo))
            if not distributed.is_main():
                return
            for name in cfg.evaluate.datasets if chosen.learns_from == "evaluate" else cfg.train.datasets:  # what it learned from
                log.log_dataset(name, latents / name / "index.csv", "training")
            log.log_artifact(out / CONFIG_FILE)  # the MLflow model `detector` comes with evaluate's run, thresholds fitted
    except (ParamsError, CheckpointError, ImageError, FileNotFoundError, ValueError, registry.UnknownMethod) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None



if __name__ == "__main__":
    app_for(main, __doc__)()
