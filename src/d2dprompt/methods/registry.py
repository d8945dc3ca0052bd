"""The one registry: method name -> Method (base.py). The stages, predict, the Python API, the web app and the MLflow
model reach a method only through `get`; params.yaml's `methods` may list any name registered here.

A method of this package is one folder under methods/ and one line in BUILT_IN. A method living elsewhere (your
package, a test) calls `register(YourMethod())` before params are read; DVC stages then need the module imported,
e.g. through the `D2D_METHODS` environment variable (`module` or `module:attribute`, comma-separated), read once here.
"""

from __future__ import annotations

import importlib
import os

from d2dprompt.methods.anomalyclip import AnomalyCLIPMethod
from d2dprompt.methods.base import Method

__all__ = ["BUILT_IN", "Method", "UnknownMethod", "get", "methods", "names", "register", "unregister"]
from d2dprompt.methods.d2d import D2DMethod
from d2dprompt.methods.d2dprompt import D2DPromptMethod
from d2dprompt.methods.decodiff import DecoDiffMethod
from d2dprompt.methods.draem import DraemMethod
from d2dprompt.methods.patchknn import PatchKNNMethod

BUILT_IN: tuple[Method, ...] = (D2DPromptMethod(), D2DMethod(), AnomalyCLIPMethod(), DraemMethod(), DecoDiffMethod(), PatchKNNMethod())
PLUGINS_ENV = "D2D_METHODS"  # modules that register methods of their own when imported

_methods: dict[str, Method] = {m.name: m for m in BUILT_IN}
version = 0  # bumped by register: params.params_model() rebuilds the params schema when it changes


class UnknownMethod(ValueError):
    """A method name no registered method has."""


def register(method: Method) -> Method:
    """Add a method (once per name); its params block, if any, becomes params.yaml's block `<name>`."""
    global version
    from d2dprompt.core.runtime.config import CoreParams

    if not isinstance(method, Method):
        raise TypeError(f"{method!r}: a method is an instance of d2dprompt.methods.base.Method")
    if method.name in CoreParams.model_fields:
        raise ValueError(f"{method.name!r}: a params block of the pipeline has this name; name the method otherwise")
    known = _methods.get(method.name)
    if known is not None and type(known) is not type(method):
        raise ValueError(f"{method.name!r}: a method of this name is registered already ({type(known).__name__})")
    _methods[method.name] = method
    version += 1
    return method


def unregister(name: str) -> None:
    """Take a method registered with `register` out again (a test's method, once the test is done)."""
    global version
    if any(m.name == name for m in BUILT_IN):
        raise ValueError(f"{name!r}: a built-in method stays registered")
    _methods.pop(name, None)
    version += 1


def get(name: str) -> Method:
    _load_plugins()
    if name not in _methods:
        raise UnknownMethod(f"unknown method {name!r}; registered: {' | '.join(_methods)}")
    return _methods[name]


def names() -> list[str]:
    _load_plugins()
    return list(_methods)


def methods() -> list[Method]:
    _load_plugins()
    return list(_methods.values())


_plugins_loaded: set[str] = set()


def _load_plugins() -> None:
    """Import the modules D2D_METHODS names (each registers its methods); an attribute that is a Method is registered."""
    for spec in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        if spec in _plugins_loaded:
            continue
        _plugins_loaded.add(spec)
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UnknownMethod(f"{PLUGINS_ENV}: cannot import {module_name!r} ({err})") from None
        if attribute:
            register(getattr(module, attribute))
