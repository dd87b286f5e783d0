"""Typed settings with explicit ranges, checked in one place.

The training, SCST, model (config.json) and generation (generation_config.json) settings are
dataclasses whose fields are declared with :func:`setting`; their ``__post_init__`` calls
:func:`check_settings`, so a bad value from the command line, a JSON file or Python code gets
the same message: the setting, the value and what is allowed. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from captioner.errors import ConfigError

T = TypeVar("T")
BACKENDS = ("auto", "onnx", "torch")  # feature extraction / inference backends
_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Bounds:
    """The allowed values of one setting: a numeric range and/or a fixed set of choices."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None

    def allows(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if isinstance(value, str):
            return True
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def describe(self) -> str:
        """In words: 'one of a, b or c', 'at least 0', 'from 1 to 4', 'at least 0 and below 1'."""
        if self.choices is not None:
            return "one of " + join_choices(self.choices)
        if self.ge is not None and self.le is not None:
            return f"from {_num(self.ge)} to {_num(self.le)}"
        low = (
            f"at least {_num(self.ge)}"
            if self.ge is not None
            else (f"greater than {_num(self.gt)}" if self.gt is not None else "")
        )
        high = (
            f"at most {_num(self.le)}"
            if self.le is not None
            else (f"below {_num(self.lt)}" if self.lt is not None else "")
        )
        return " and ".join(part for part in (low, high) if part) or "any value"

    @property
    def empty(self) -> bool:
        return self == Bounds()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def join_choices(choices: tuple[str, ...] | list[str]) -> str:
    choices = list(choices)
    return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + f" or {choices[-1]}"


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - mirrors argparse's name
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with help text (for the CLI) and its allowed values."""
    bounds = Bounds(ge=ge, gt=gt, le=le, lt=lt, choices=choices)
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds})


def bounds_of(f: dataclasses.Field) -> Bounds:
    return f.metadata.get("bounds", Bounds())


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(annotation: Any) -> tuple[type, bool]:
    """int / float / str / bool, and whether None is allowed too."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if annotation not in _KIND_WORDS:
        raise TypeError(f"settings support int, float, str and bool fields, not {annotation}")
    return annotation, optional


def check_value(label: str, value: Any, kind: type, optional: bool, bounds: Bounds) -> Any:
    """The value (an int given for a float becomes a float) or a ConfigError that names the
    setting, the value and what is allowed."""
    if value is None and optional:
        return None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        allowed = _KIND_WORDS[kind] + (" or null" if optional else "")
        raise ConfigError(f"{label} must be {allowed}, not {value!r}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number, not {value!r}")
    if not bounds.allows(value):
        raise ConfigError(f"{label} must be {bounds.describe()}, not {value!r}")
    return value


def check_settings(obj: Any, *, flags: bool) -> None:
    """Check every field of a settings dataclass against its type and bounds (in place).

    ``flags``: name the settings as command-line flags (--label-smoothing) rather than as
    JSON keys (hidden_dim).
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        kind, optional = _kind(hints[f.name])
        label = flag_name(f.name) if flags else f.name
        value = check_value(label, getattr(obj, f.name), kind, optional, bounds_of(f))
        setattr(obj, f.name, value)


def settings_from_json(cls: type[T], data: Any, what: str) -> T:
    """A settings dataclass from parsed JSON: an object with known keys only, none missing."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object, not {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown {what} keys: {sorted(unknown)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{what} lacks {', '.join(missing)}")
    return cls(**data)


def check_choice(label: str, value: str, choices: tuple[str, ...]) -> str:
    """For a plain CLI option: the value, or a ConfigError listing the choices."""
    if value not in choices:
        raise ConfigError(f"{label} must be one of {join_choices(choices)}, not {value!r}")
    return value


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cap_threads(requested: int, flag: str = "--threads", log=print) -> int:
    """``requested`` threads (0 = all cores), at most the cores there are: more threads than
    cores only contend (999 of them ran 250x slower), so the excess is dropped with a note."""
    cores = available_cores()
    if requested > cores:
        log(f"note: {flag} {requested} is more than the {cores} CPU cores here: using {cores}")
        return cores
    return requested


def check_folder_option(path: str | os.PathLike[str], flag: str) -> None:
    """A folder the command will create or write into: refuse, before any work, a path that is
    (or lies under) an existing file, which would otherwise fail only at the first write."""
    given = Path(path)
    for candidate in (given, *given.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "is a file" if candidate == given else f"lies under the file {candidate}"
                raise ConfigError(f"{flag} {given} {what}, not a folder: give a folder")
            return
