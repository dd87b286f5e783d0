"""Shared CLI plumbing: typed errors become one clear line and an exit code, never a traceback."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import typer

from captioner.errors import CaptionerError

EXIT_USER_ERROR = 2


def friendly_errors(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CaptionerError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def options_from_dataclass(cls: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One ``--flag`` per dataclass field, with its default and its ``help`` metadata."""
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        annotation: Any = f.type if not isinstance(f.type, str) else eval(f.type, {}, {})  # noqa: S307
        if annotation == (str | None):
            annotation = str | None
        option = typer.Option(
            f.default, f"--{f.name.replace('_', '-')}", help=f.metadata.get("help", "")
        )
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
            )
        )
    return params


def with_signature(func: Callable, params: list[inspect.Parameter]) -> Callable:
    func.__signature__ = inspect.Signature(params)
    return func


def die(message: str, code: int = EXIT_USER_ERROR) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(code)
