"""How every command-line tool starts: `--help` opens with the first paragraph of its module docstring
(after the usage line, which typer prints itself), then the options typer reads off `main`'s signature. No heavy import here or in the
tools' module level, so `--help` answers in about a second."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer

from d2dprompt.core.runtime import numerics


def summary(doc: str | None) -> str:
    """The first paragraph after the usage line of a module docstring, as one line (typer rewraps it)."""
    from rich.markup import escape  # typer renders help as rich markup: "[beta_min, beta_max]" would vanish

    paragraphs = [" ".join(p.split()) for p in (doc or "").strip().split("\n\n") if p.strip()]
    return escape(paragraphs[1] if len(paragraphs) > 1 else (paragraphs[0] if paragraphs else ""))


def app_for(main: Callable, doc: str | None) -> typer.Typer:
    """The command for `main`; running it (not --help) first fixes the thread count where the stages pinned numerics."""

    @functools.wraps(main)
    def command(*args, **kwargs):
        numerics.fix_threads()
        return main(*args, **kwargs)

    app = typer.Typer(add_completion=False)
    app.command(help=summary(doc))(command)
    return app
