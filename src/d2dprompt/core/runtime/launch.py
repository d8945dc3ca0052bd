"""python -m d2dprompt.core.runtime.launch --standalone --nproc_per_node=N -m d2dprompt.pipeline.<stage> [args]

torchrun, as dvc.yaml runs the queries, train and evaluate stages, with the project's one-line errors kept one line.
A worker that refuses its input prints `error: ...` and exits 1; torchrun itself would then add its own report of
the failure (a logged line, a traceback and a ~30-line "Root Cause" table) under it. Here a worker that exited 1
has said why already, so the launcher exits 1 with nothing more (the ranks torchrun then stopped included); a
failure no rank explained (a signal, a crash, another code) gets one line per rank naming its exit code or signal
and its process id. Arguments are torchrun's own.
"""

from __future__ import annotations

import logging
import signal
import sys

REFUSED = 1  # the exit code of a stage's `error: ...` line (typer.Exit(1)): the worker has explained itself


def failure_lines(failures: dict) -> list[str]:
    """Nothing when a rank explained itself (exit code REFUSED: the others were then stopped by torchrun, which is
    no news); otherwise one line per failed rank."""
    if any(failure.exitcode == REFUSED for failure in failures.values()):
        return []
    lines = []
    for rank, failure in sorted(failures.items()):
        code = failure.exitcode
        how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit code {code}"
        lines.append(f"error: rank {rank} (pid {failure.pid}) failed with {how}; rerun with distributed.nproc=1 to see its traceback")
    return lines


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure log repeats what a worker said
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        for line in failure_lines(err.failures):
            print(line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
