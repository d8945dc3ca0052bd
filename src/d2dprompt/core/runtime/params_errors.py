"""One line per bad params value: `<key.path>: <what is allowed>, got <value>`.

Pydantic reports each failure as a dict (loc, type, input, ctx); this turns the first one into words
read off the schema itself (the Literal's choices, the Field's bounds), so no message repeats a default
or a range written in config.py.
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel


class ParamsError(ValueError):
    """A params file that does not match the schema; the message is one line naming the key."""


class Invalid(ValueError):
    """Raised by a validator that checks several keys: `key` (relative to the validated model) is the one to blame."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def key_path(loc: tuple) -> str:
    """('train', 'betas', 0) -> 'train.betas[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(annotation) -> tuple[object, list]:
    """Annotated[T, Field(...), Ge(...)] -> (T, [constraints])."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        meta = []
        for item in extra:
            meta.extend(getattr(item, "metadata", [item]))  # a FieldInfo carries its constraints in .metadata
        return base, meta
    return annotation, []


class Declared(typing.NamedTuple):
    model: type[BaseModel]  # the model holding the last key
    annotation: object  # its declared type; None past the schema (an unknown key)
    meta: list  # its constraints: Ge, Lt, MinLen, ...
    hint: str  # the field's json_schema_extra["hint"], said after an out-of-range message


def _declared(root: type[BaseModel], loc: tuple) -> Declared:
    model, annotation, meta, hint = root, root, [], ""
    for part in loc:
        if isinstance(part, int):  # a list item
            annotation, meta = _unwrap((typing.get_args(annotation) or (None,))[0])
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return Declared(model, None, [], "")
        if part not in annotation.model_fields:  # an unknown key: the block it sits in names the known ones
            return Declared(annotation, None, [], "")
        model, field = annotation, annotation.model_fields[part]
        annotation, meta = field.annotation, list(field.metadata)
        hint = (field.json_schema_extra or {}).get("hint", "") if isinstance(field.json_schema_extra, dict) else ""
    return Declared(model, annotation, meta, hint)


def _bounds(meta: list) -> str:
    """[Gt(0), Le(100)] -> 'in (0, 100]'; [Ge(1)] -> '>= 1'; '' without numeric bounds."""
    found = {name: getattr(m, name) for m in meta for name in ("ge", "gt", "le", "lt") if getattr(m, name, None) is not None}
    low = (f"[{found['ge']:g}" if "ge" in found else f"({found['gt']:g}") if {"ge", "gt"} & set(found) else None
    high = (f"{found['le']:g}]" if "le" in found else f"{found['lt']:g})") if {"le", "lt"} & set(found) else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def _choices(annotation) -> str:
    return " | ".join(str(c) for c in typing.get_args(annotation))


def _item_words(annotation) -> str:
    """What each item of a list must be, e.g. 'numbers in [0, 1)' or 'one of sample | mvtec'."""
    item, meta = _unwrap((typing.get_args(annotation) or (None,))[0])
    if typing.get_origin(item) is typing.Literal:
        return f", each one of {_choices(item)}"
    bounds = _bounds(meta)
    return f", each {bounds}" if bounds else ""


def _unknown_key(model: type[BaseModel], loc: tuple) -> str:
    """Names the keys the block takes, and the closest one: most unknown keys are typos."""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    renamed = getattr(model, "RENAMED", {}).get(str(loc[-1]))
    if renamed:
        hint = f" (now {renamed})"
    if len(loc) == 1:
        return f"unknown block{hint}; blocks: {', '.join(allowed)}"
    return f"unknown key{hint}; {key_path(loc[:-1])} takes {', '.join(allowed)}"


def _length(meta: list, kind: str) -> str:
    low = next((m.min_length for m in meta if hasattr(m, "min_length")), None)
    high = next((m.max_length for m in meta if hasattr(m, "max_length")), None)
    count = f"exactly {low}" if low == high else f"at least {low}" if kind == "too_short" else f"at most {high}"
    return f"{count} value{'' if (low if kind == 'too_short' else high) == 1 else 's'}"


def describe(error: dict, root: type[BaseModel]) -> str:
    """One pydantic error dict -> '<key.path>: <message naming the allowed values>'."""
    loc, kind, value, ctx = tuple(error["loc"]), error["type"], error.get("input"), error.get("ctx") or {}
    cause = ctx.get("error")
    if kind == "value_error" and isinstance(cause, Invalid):
        loc = loc + tuple(cause.key.split("."))
    at = _declared(root, loc)
    got = f", got {value!r}"
    if kind == "extra_forbidden":
        message = _unknown_key(at.model, loc)
    elif kind == "value_error":
        message = str(cause)
    elif kind == "literal_error":
        message = f"must be one of {_choices(at.annotation)}{got}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = f"must be {_bounds(at.meta)}{got}" + (f" ({at.hint})" if at.hint else "")
    elif kind in ("too_short", "too_long"):
        message = f"must hold {_length(at.meta, kind)}{_item_words(at.annotation)}{got}"
    elif kind == "model_type":
        message = f"must be a mapping of keys{got}"
    elif kind == "int_type":
        message = f"must be a whole number{got}"
    elif kind == "float_type":
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and _is_number(value) else ""
        message = f"must be a number{got}{hint}"
    elif kind == "finite_number":
        message = f"must be a finite number{got}"
    elif kind == "string_type":
        hint = " (YAML reads an unquoted 01 as the number 1: quote it, '01')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        message = f"must be text{' or null' if type(None) in typing.get_args(at.annotation) else ''}{got}{hint}"
    elif kind == "string_too_short":
        message = f"must not be empty{got}"
    elif kind == "bool_type":
        message = f"must be true or false{got}"
    elif kind == "list_type":
        message = f"must be a list{_item_words(at.annotation)}{got}"
    else:  # a check with no wording of its own: pydantic's
        message = f"{error['msg']}{got}"
    return f"{key_path(loc)}: {message}" if loc else message


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
