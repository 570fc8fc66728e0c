"""Command-line options read from settings dataclasses (jora_model.schema): each setting becomes one
option with the setting's name, default, bounds or choices and help, so a command never restates them.

    @settings_options(TrainSettings, "settings")   # the command receives settings=TrainSettings(...)
    @option_for(LoraSettings, "r", dest="lora_r")  # one setting's option, its value passed as lora_r
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from pathlib import Path
from typing import Any, Callable

import click

from jora_model.schema import Setting, field_types, settings_of, spec_of, unwrap


def option_name(field: dataclasses.Field, spec: Setting) -> str:
    return spec.option or "--" + field.name.replace("_", "-")


def _nested(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation) and bool(settings_of(annotation))


def _convert(base: Any, spec: Setting) -> Callable[[Any, Any, Any], Any]:
    """The click callback turning what was typed into the field's value."""
    def convert(ctx, param, value):
        if value is None:
            return None
        if typing.get_origin(base) is tuple:
            return tuple(item.strip() for item in value.split(",") if item.strip())
        if spec.path:
            return str(Path(value).resolve())
        return value * spec.unit if spec.unit != 1 else value
    return convert


def _number_type(base: type, spec: Setting):
    unit = spec.unit
    low = spec.ge if spec.ge is not None else spec.gt
    high = spec.le if spec.le is not None else spec.lt
    if low is None and high is None:
        return base
    if base is int:
        low = None if low is None else (math.ceil(low / unit) if spec.gt is None else math.floor(low / unit))
        return click.IntRange(low, None if high is None else high // unit, min_open=spec.gt is not None,
                              max_open=spec.lt is not None)
    return click.FloatRange(low, high, min_open=spec.gt is not None, max_open=spec.lt is not None)


def make_option(field: dataclasses.Field, spec: Setting, annotation: Any, dest: str, **overrides: Any):
    """The click.option decorator for one setting; `overrides` replace its default or help, or add a note
    to the help."""
    base, _ = unwrap(annotation)
    name = option_name(field, spec)
    default = overrides.get("default", field.default)
    note = f"; {overrides['note']}" if "note" in overrides else ""
    kwargs: dict[str, Any] = {"help": overrides.get("help", spec.help) + note, "envvar": spec.env,
                              "show_envvar": spec.env is not None, "metavar": spec.metavar}
    if base is bool:
        off = spec.off or "--no-" + name[2:]
        return click.option(f"{name}/{off}", dest, default=default, show_default=True, **kwargs)
    if spec.choices is not None and base is str:
        kind: Any = click.Choice(spec.choices)
    elif base in (int, float):
        kind = _number_type(base, spec)
    elif spec.path:
        kind = click.Path()
    else:
        kind = str
    if isinstance(default, tuple):
        default = ",".join(default)
    elif isinstance(default, int) and not isinstance(default, bool) and spec.unit != 1:
        default //= spec.unit
    return click.option(name, dest, type=kind, default=default, show_default=default not in (None, ""),
                        callback=_convert(base, spec), **kwargs)


def _options(cls: type, prefix: str, exclude: tuple[str, ...]):
    """(dest, option) for every command-line setting of `cls` and its nested settings; a nested
    setting's dest joins the field names with "__"."""
    types = field_types(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        if _nested(types[field.name]):
            yield from _options(types[field.name], f"{prefix}{field.name}__", ())
            continue
        spec = spec_of(field)
        if spec is not None and spec.cli:
            dest = prefix + field.name
            yield dest, make_option(field, spec, types[field.name], dest)


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    types = field_types(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if _nested(types[field.name]) and any(k.startswith(f"{prefix}{field.name}__") for k in values):
            kwargs[field.name] = _build(types[field.name], values, f"{prefix}{field.name}__")
        elif prefix + field.name in values:
            kwargs[field.name] = values[prefix + field.name]
    return cls(**kwargs)


def settings_options(cls: type, into: str, exclude: tuple[str, ...] = ()):
    """Add an option for every setting of `cls` (nested settings dataclasses included, e.g. TrainSettings'
    lora) except `exclude`; the command receives `into=cls(...)` built from them."""
    options = list(_options(cls, into + "__", exclude))

    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            values = {dest: kwargs.pop(dest) for dest, _ in options}
            kwargs[into] = _build(cls, values, into + "__")
            return fn(*args, **kwargs)

        for _, option in reversed(options):  # click lists the last-applied option first
            command = option(command)
        return command

    return decorate


def option_for(cls: type, name: str, dest: str | None = None, **overrides: Any):
    """One setting's option (its value passed as `dest`, default the field's name); `overrides` may give
    another default, help or note where the command means something narrower."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return make_option(field, spec_of(field), field_types(cls)[name], dest or name, **overrides)
