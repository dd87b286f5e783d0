"""Shared CLI plumbing: typed errors become one clear line and an exit code, never a traceback;
flags show no value placeholder in --help; dataclass settings become flags."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from typer.core import TyperGroup

from captioner.errors import CaptionerError, ConfigError
from captioner.io import unwritable_reason
from captioner.settings import bounds_of, flag_name

if TYPE_CHECKING:  # Typer's vendored click
    from typer._click import core as click

EXIT_USER_ERROR = 2
MODEL_HELP = "saved model directory (from training); default: the bundled pretrained model"


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


def check_writable(path: Path, flag: str, folder: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done (not after hours of
    decoding); see :func:`captioner.io.unwritable_reason`. ConfigError: one line."""
    reason = unwritable_reason(path, folder)
    if reason is not None:
        raise ConfigError(f"{flag} {path}: {reason}")


def hide_flag_metavars(command: click.Command, ctx: click.Context) -> None:
    """Typer labels every option with its type, flags included (``--help <bool>``), which reads
    as if the flag took a value: give flags an empty metavar instead, in nested groups too."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False):
            param.metavar = ""
    if isinstance(command, TyperGroup):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                hide_flag_metavars(sub, ctx)


class CaptionerGroup(TyperGroup):
    """The top-level command group: its own and its commands' flags get no metavar."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            hide_flag_metavars(command, ctx)
        return command


def options_from_dataclass(cls: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One ``--flag`` per dataclass field, with its default, its help and its allowed range
    (the range is checked by the dataclass itself, see captioner.settings)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        help_text = f.metadata.get("help", "")
        bounds = bounds_of(f)
        if not bounds.empty and bounds.choices is None:
            help_text = f"{help_text}; {bounds.describe()}"
        option = typer.Option(f.default, flag_name(f.name), help=help_text)
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]
            )
        )
    return params


def with_signature(func: Callable, params: list[inspect.Parameter]) -> Callable:
    func.__signature__ = inspect.Signature(params)
    return func


def die(message: str, code: int = EXIT_USER_ERROR) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(code)
