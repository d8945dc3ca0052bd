"""The DVC stages, one module each (`python -m d2dprompt.pipeline.<stage>`): they read params.yaml, do the I/O and logging, and reach methods through `d2dprompt.methods.registry`.

Importing this package pins portable CPU numerics (core/runtime/numerics.py, README "Reproducibility") before any stage
loads torch, so the stored arrays and metrics are the same bits on every x86-64 CPU with AVX2; `D2D_CPU=native` opts out.
"""

from d2dprompt.core.runtime import numerics

try:
    numerics.pin()
except numerics.NumericsError as err:  # one line, as every stage's errors
    raise SystemExit(f"error: {err}") from None
