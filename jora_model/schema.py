"""Settings defined once: a dataclass field carries its default, bounds or choices and help text, and
every other place a setting appears is read from that field.

    lr: float = setting(1e-4, "peak learning rate", gt=0, label="learning rate")

`check_settings` (called by each settings dataclass's __post_init__) is the one validation; the command
options (stages/options.py), the YAML sections (pipeline/settings.py), the GUI form and README's table
are derived from, or tested against, the same fields. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from jora_model.errors import JoraError

_KEY = "jora.setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    help: str  # one line: what the setting means (option help, YAML description, GUI hint)
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None  # the allowed values (of each item, for a tuple setting)
    label: str | None = None  # how an error names it [the field's name]
    option: str | None = None  # its command-line option [--field-name]
    off: str | None = None  # a switch's "off" option [--no-field-name]
    env: str | None = None  # the environment variable read when it is not given
    metavar: str | None = None
    unit: int = 1  # the command-line option counts in units of this many (a byte count given in MiB)
    path: bool = False  # a file or directory: relative paths are taken from where the user stands
    cli: bool = True  # False: not an option of its command (set from the library or the YAML only)


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field holding `default`, described by `Setting(help, **spec)`."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("a setting's default must be immutable (a tuple, not a list)")
    return dataclasses.field(default=default, metadata={_KEY: Setting(help, **spec)})


def same_as(cls: type, name: str, **changes: Any) -> Any:
    """A field defined as `cls`'s field `name`, with `changes` (default=..., or Setting's own fields)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = changes.pop("default", field.default)
    return dataclasses.field(default=default, metadata={_KEY: dataclasses.replace(field.metadata[_KEY], **changes)})


def spec_of(field: dataclasses.Field) -> Setting | None:
    """The Setting of a field made by `setting`, else None."""
    return field.metadata.get(_KEY)


def settings_of(cls: type) -> list[tuple[dataclasses.Field, Setting]]:
    """(field, its Setting) for every field of `cls` defined with `setting`, in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def field_types(cls: type) -> dict[str, Any]:
    """The fields' annotations as types (the modules write them as strings)."""
    return typing.get_type_hints(cls)


def unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def check_settings(settings: Any) -> None:
    """Raise a JoraError naming the first field of `settings` outside its bounds or choices."""
    for field, spec in settings_of(type(settings)):
        problem = _problem(spec.label or field.name, getattr(settings, field.name), spec, field.default)
        if problem:
            raise JoraError(problem)


def _problem(label: str, value: Any, spec: Setting, default: Any) -> str | None:
    if value is None and default is None:
        return None
    if isinstance(value, (tuple, list)) and spec.choices is not None:
        unknown = sorted(set(value) - set(spec.choices))
        if unknown or not value:
            return f"unknown {label} {unknown or '(none)'}; choose from {', '.join(spec.choices)}"
        return None
    if spec.choices is not None:
        return None if value in spec.choices else f"{label} must be one of {', '.join(spec.choices)}, got {value!r}"
    bounded = any(b is not None for b in (spec.ge, spec.gt, spec.le, spec.lt))
    if isinstance(value, float) and not math.isfinite(value):
        return f"{label} must be a finite number, got {value}"
    if not bounded:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{label} must be a number, got {value!r}"
    inside = ((spec.ge is None or value >= spec.ge) and (spec.gt is None or value > spec.gt)
              and (spec.le is None or value <= spec.le) and (spec.lt is None or value < spec.lt))
    return None if inside else f"{label} must be {describe_range(spec)}, got {value}"


def describe_range(spec: Setting) -> str:
    """"at least 1", "positive", "in [0, 1)", ... (the bounds as a sentence says them)."""
    low = spec.ge if spec.ge is not None else spec.gt
    high = spec.le if spec.le is not None else spec.lt
    if low is not None and high is not None:
        return f"in {'[' if spec.ge is not None else '('}{low}, {high}{']' if spec.le is not None else ')'}"
    if spec.ge is not None:
        return f"at least {spec.ge}"
    if spec.gt is not None:
        return "positive" if spec.gt == 0 else f"more than {spec.gt}"
    return f"at most {spec.le}" if spec.le is not None else f"less than {spec.lt}"
