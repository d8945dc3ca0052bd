"""params.yaml as one typed, checked object: the core blocks (core/runtime/config.py) plus one block per registered
method that has one (methods/registry.py), named like the method. Every stage, predict, the API and the app read
params through `load_params`; a typo, a wrong type, a value out of range, an unknown method or a contradiction stops
them with one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

from pydantic import create_model, model_validator

from d2dprompt.core.runtime.config import CoreParams, Invalid, ParamsError, read_params, validate_params
from d2dprompt.methods import registry

__all__ = ["Params", "ParamsError", "load_params", "params_from_dict", "params_model"]

_model: tuple[int, type[CoreParams]] | None = None


def _registered(self: CoreParams) -> CoreParams:
    known = registry.names()
    for name in self.methods:
        if name not in known:
            raise Invalid("methods", f"{name!r} is not a registered method; choose from {' | '.join(known)}")
    for name in self.methods:
        registry.get(name).check(self)
    return self


def params_model() -> type[CoreParams]:
    """The schema of params.yaml for the methods registered now."""
    global _model
    registry.names()  # imports D2D_METHODS' modules first
    if _model is None or _model[0] != registry.version:
        blocks = {m.name: (m.params, m.params()) for m in registry.methods() if m.params is not None}
        validators = {"_registered": model_validator(mode="after")(_registered)}
        _model = (registry.version, create_model("Params", __base__=CoreParams, __validators__=validators, **blocks))
    return _model[1]


def params_from_dict(raw: dict | None) -> CoreParams:
    """Params from a nested dict; missing keys take their defaults, anything else raises ParamsError."""
    return validate_params(raw, params_model())


def load_params(path: str | Path = "params.yaml") -> CoreParams:
    """Read and check a params file; every problem is one ParamsError line starting with `path`."""
    return read_params(path, params_model())


def __getattr__(name: str):
    """`Params`: the schema for the methods registered now (`Params()` = every default, method blocks included)."""
    if name == "Params":
        return params_model()
    raise AttributeError(f"module 'd2dprompt.params' has no attribute {name!r}")
