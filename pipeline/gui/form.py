"""The GUI's form: every FinetuneSettings field, grouped as the page shows them, and the conversion
between what the widgets hold and a validated FinetuneSettings.

The fields are read from the pydantic models in pipeline/settings.py, so a setting added there appears
on the page (in its section's group) without touching the GUI. Help texts come from the comments of
pipeline/finetune.example.yaml, which documents every field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from jora_model.formats.layout import LINEAR_NAMES
from pipeline.settings import FinetuneSettings, set_dotted

EXAMPLE_YAML = Path(__file__).resolve().parents[1] / "finetune.example.yaml"

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
    ("Export", ("export.",)),
)
# Multiple-choice lists: which values a list field may hold.
LIST_CHOICES = {"lora.targets": tuple(LINEAR_NAMES)}

Kind = Literal["text", "int", "float", "bool", "choice", "multi"]


@dataclasses.dataclass(frozen=True)
class FormField:
    name: str  # dotted setting name ("train.lr"): the --set KEY, the YAML path, the key of its error
    kind: Kind  # which widget edits it
    default: Any  # the seed's default, as the widget holds it ("" / None for an unset optional)
    optional: bool  # blank means None (model.tokenizer, train.max_steps)
    choices: tuple[str, ...]  # the allowed values of a choice or multi field
    help: str  # one line: the example YAML's comment, or the field's description


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _kind(name: str, annotation: Any) -> tuple[Kind, tuple[str, ...]]:
    if typing.get_origin(annotation) is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return "multi", LIST_CHOICES.get(name, ())
    return {bool: "bool", int: "int", float: "float"}.get(annotation, "text"), ()


def example_comments(path: Path = EXAMPLE_YAML) -> dict[str, str]:
    """Dotted name -> the comment after it in the example YAML (the documented meaning of each field)."""
    comments: dict[str, str] = {}
    section = ""
    if not path.is_file():
        return comments
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^(\s*)([A-Za-z_]+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
        if not match:
            continue
        indent, key, value, comment = match.groups()
        if not indent:
            section = key if not value else ""
            name = key
        else:
            name = f"{section}.{key}"
        if comment:
            comments[name] = comment
    return comments


def form_fields() -> list[FormField]:
    """Every setting, in the order of settings.py."""
    comments = example_comments()
    fields: list[FormField] = []

    def walk(model: type[BaseModel], prefix: str, defaults: BaseModel) -> None:
        for key, info in model.model_fields.items():
            annotation, optional = _unwrap(info.annotation)
            name = prefix + key
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, name + ".", getattr(defaults, key))
                continue
            kind, choices = _kind(name, annotation)
            fields.append(FormField(name, kind, _to_widget(kind, getattr(defaults, key)), optional, choices,
                                    comments.get(name) or info.description or ""))

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
