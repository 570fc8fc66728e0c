"""The GUI's form: every FinetuneSettings field, grouped as the page shows them, and the conversion
between what the widgets hold and a validated FinetuneSettings.

The fields are read from the pydantic models in pipeline/settings.py, which are made from the settings'
own definitions (jora_model.schema): a setting added there appears on the page (in its section's group)
with its default, choices and help, without touching the GUI.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from jora_model.schema import unwrap
from pipeline.settings import FinetuneSettings, set_dotted

# Page groups: (title, setting names or section prefixes). The mesh (and the multi-host settings that
# say which devices it spans) has its own group because it is the setting most likely to be wrong on a
# new machine; every other field goes by its section. Names not in settings.py are ignored.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Work directory", ("workdir",)),
    ("Model", ("model.",)),
    ("Data", ("data.",)),
    ("LoRA", ("lora.",)),
    ("Training", ("train.",)),
    ("Mesh", ("train.mesh", "train.num_processes", "train.process_id", "train.coordinator",
              "train.heartbeat_timeout")),
    ("Evaluation gate", ("eval.",)),
    ("Export", ("export.",)),
)
Kind = Literal["text", "int", "float", "bool", "choice", "multi"]


@dataclasses.dataclass(frozen=True)
class FormField:
    name: str  # dotted setting name ("train.lr"): the --set KEY, the YAML path, the key of its error
    kind: Kind  # which widget edits it
    default: Any  # the seed's default, as the widget holds it ("" / None for an unset optional)
    optional: bool  # blank means None (model.tokenizer, train.max_steps)
    choices: tuple[str, ...]  # the allowed values of a choice or multi field
    help: str  # one line: the setting's help


def _kind(annotation: Any) -> tuple[Kind, tuple[str, ...]]:
    if typing.get_origin(annotation) is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return "multi", tuple(str(a) for a in typing.get_args(item)) if typing.get_origin(item) is Literal else ()
    return {bool: "bool", int: "int", float: "float"}.get(annotation, "text"), ()


def form_fields() -> list[FormField]:
    """Every setting, in the order of settings.py."""
    fields: list[FormField] = []

    def walk(model: type[BaseModel], prefix: str, defaults: BaseModel) -> None:
        for key, info in model.model_fields.items():
            annotation, optional = unwrap(info.annotation)
            name = prefix + key
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, name + ".", getattr(defaults, key))
                continue
            kind, choices = _kind(annotation)
            fields.append(FormField(name, kind, _to_widget(kind, getattr(defaults, key)), optional, choices,
                                    info.description or ""))

    walk(FinetuneSettings, "", FinetuneSettings())
    return fields


def grouped(fields: list[FormField]) -> list[tuple[str, list[FormField]]]:
    """The fields of each group in GROUPS, each field in the first group that claims it exactly, else
    in its section's group."""
    exact = {name for _, names in GROUPS for name in names if not name.endswith(".")}
    out = []
    for title, names in GROUPS:
        members = [f for f in fields if f.name in names
                   or (f.name not in exact and any(n.endswith(".") and f.name.startswith(n) for n in names))]
        out.append((title, members))
    return out


def _to_widget(kind: Kind, value: Any) -> Any:
    if value is None:
        return "" if kind == "text" else None
    if kind == "multi":
        return list(value)
    return value


def to_form(settings: FinetuneSettings, fields: list[FormField]) -> list[Any]:
    """Widget values for `settings`, in the order of `fields`."""
    values = settings.model_dump()
    out = []
    for field in fields:
        value: Any = values
        for part in field.name.split("."):
            value = value[part]
        out.append(_to_widget(field.kind, value))
    return out


def from_form(fields: list[FormField], values: list[Any], base: Path) -> tuple[FinetuneSettings | None,
                                                                              dict[str, str]]:
    """The settings the widgets hold (relative paths taken from `base`), or the problems found, by
    field name."""
    errors: dict[str, str] = {}
    raw: dict[str, Any] = {}
    for field, value in zip(fields, values, strict=True):
        if isinstance(value, str):
            value = value.strip()
        if value in ("", None) and field.kind in ("text", "int", "float"):
            if field.optional:
                value = None
            elif field.kind != "text":
                errors[field.name] = "a number is needed here"
                continue
        if field.kind == "int" and value is not None:
            if float(value) != int(float(value)):
                errors[field.name] = f"a whole number is needed here, not {value}"
                continue
            value = int(float(value))
        set_dotted(raw, field.name, value)
    try:
        settings = FinetuneSettings.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            name = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
            errors.setdefault(name, error["msg"])
        return None, errors
    if errors:
        return None, errors
    return settings.resolved(base), errors
