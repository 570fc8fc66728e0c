"""The pipeline's settings: one typed object (the Prefect UI renders a form for it), loadable from YAML.

Nothing here restates a setting: each YAML section is made from the fields of the dataclasses that own
them (LAYOUT), with their defaults, bounds, choices and help, and `build` turns a section back into those
dataclasses. Every field is documented in pipeline/finetune.example.yaml and README's "Every setting"
(tests/test_settings_schema.py keeps both in step). Relative paths in a YAML file are taken relative to
that file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from jora_model.errors import JoraError
from jora_model.model.lora import LoraSettings
from jora_model.schema import Setting, field_types, setting, settings_of, unwrap
from jora_model.training.settings import TrainSettings
from jora_model.evaluation.gate import GateSettings
from stages.convert import ConvertSettings
from stages.evaluate import EvaluateSettings
from stages.export import ExportSettings
from stages.tokenize import TokenizeSettings
from stages.train import HostSettings


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    """The settings only the flow has: what it reads, where it writes, and which steps it takes."""
    workdir: str = setting(".", "every stage writes its output under this directory: store/, tokenized/, train/, "
                           "merged/, hf-model/, peft-adapter/", path=True)
    checkpoint: str = setting("", "Meta's checkpoint directory (params.json, consolidated.NN.pth) or an HF Llama "
                              "directory", path=True)
    path: str = setting("", "Alpaca JSON or JSON Lines: instruction, input (the retrieved context), output",
                        path=True)
    warm_start: bool = setting(False, "when the data changed, start from the previous run's adapter")
    peft_adapter: bool = setting(True, "also export the adapter for peft (peft-adapter/)")
    data: str = setting("", "the golden set the gate scores (Alpaca JSON or JSON Lines), kept fixed by the team "
                        "[default: the tokenize stage's held-out split]", path=True)


_EVERY = None  # a LAYOUT entry's "every setting of the class"
# YAML section -> (dataclass, which of its settings) in the order the file and the GUI show them. A key's
# name is the field's name. TrainSettings.max_seq_len is data.max_seq_len (tokenize's), see NOT_IN_YAML.
LAYOUT: dict[str, tuple[tuple[type, tuple[str, ...] | None], ...]] = {
    "": ((FlowSettings, ("workdir",)),),
    "model": ((FlowSettings, ("checkpoint",)), (ConvertSettings, ("dtype", "tokenizer"))),
    "data": ((FlowSettings, ("path",)), (TokenizeSettings, ("template", "system", "max_seq_len", "val_fraction", "seed",
                                                             "pack", "strict"))),
    "lora": ((LoraSettings, _EVERY),),
    "train": ((TrainSettings, tuple(f.name for f, _ in settings_of(TrainSettings)
                                    if f.name not in ("max_seq_len", "pad_multiple", "eval_batch_size"))),
              (FlowSettings, ("warm_start",)), (HostSettings, _EVERY)),
    "eval": ((FlowSettings, ("data",)), (GateSettings, _EVERY), (EvaluateSettings, ("max_new_tokens", "batch_size"))),
    "export": ((ExportSettings, _EVERY), (FlowSettings, ("peft_adapter",))),
}
# The settings no YAML key sets, and why.
NOT_IN_YAML = {
    (TrainSettings, "max_seq_len"): "data.max_seq_len sets it, for tokenize and train alike",
    (TrainSettings, "pad_multiple"): "library only",
    (TrainSettings, "eval_batch_size"): "library only",
    (ConvertSettings, "max_shard_bytes"): "the store's shard size: jora convert --max-shard-size only",
    (EvaluateSettings, "template"): "data.template prompts training and evaluation alike",
    (EvaluateSettings, "system"): "data.system prompts training and evaluation alike",
    (EvaluateSettings, "max_seq_len"): "data.max_seq_len cuts golden records as it cuts training records",
    (EvaluateSettings, "compute_dtype"): "jora evaluate --compute-dtype only (the gate scores in float32)",
}


def yaml_settings() -> dict[str, tuple[type, dataclasses.Field, Setting]]:
    """Dotted YAML name ("train.lr") -> (owning dataclass, field, Setting), in LAYOUT's order."""
    out = {}
    for section, parts in LAYOUT.items():
        for cls, names in parts:
            for field, spec in settings_of(cls):
                if names is _EVERY or field.name in names:
                    out[f"{section}.{field.name}" if section else field.name] = (cls, field, spec)
    return out


def _pydantic_field(annotation: Any, default: Any, spec: Setting) -> tuple[Any, Any]:
    base, optional = unwrap(annotation)
    constraints = {k: getattr(spec, k) for k in ("ge", "gt", "le", "lt") if getattr(spec, k) is not None}
    if base is float:
        constraints["allow_inf_nan"] = False
    if spec.choices is not None and base is str:
        base = Literal[spec.choices]
    elif isinstance(default, tuple):  # a YAML list; each item one of the choices
        base = list[Literal[spec.choices] if spec.choices is not None else str]
        default, constraints["min_length"] = list(default), 1
    return (Optional[base] if optional else base), Field(default, description=spec.help, **constraints)


def _remat_from_bool(cls, value: Any) -> Any:
    # settings files written before the policies said `remat: true` or `false`
    return {True: "matmuls", False: "none"}[value] if isinstance(value, bool) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _section_model(name: str, section: str) -> type[BaseModel]:
    fields = {}
    for dotted, (cls, field, spec) in yaml_settings().items():
        if dotted.rpartition(".")[0] == section:
            fields[field.name] = _pydantic_field(field_types(cls)[field.name], field.default, spec)
    validators = {"remat_from_bool": field_validator("remat", mode="before")(_remat_from_bool)} \
        if "remat" in fields else None
    return create_model(name, __base__=_Section, __module__=__name__, __validators__=validators, **fields)


ModelSection = _section_model("ModelSection", "model")
DataSection = _section_model("DataSection", "data")
LoraSection = _section_model("LoraSection", "lora")
TrainSection = _section_model("TrainSection", "train")
EvalSection = _section_model("EvalSection", "eval")
ExportSection = _section_model("ExportSection", "export")
_SECTIONS = {"model": ModelSection, "data": DataSection, "lora": LoraSection, "train": TrainSection,
             "eval": EvalSection, "export": ExportSection}
_Top = create_model("_Top", __base__=_Section, __module__=__name__,
                    **{name: _pydantic_field(field_types(cls)[field.name], field.default, spec)
                       for name, (cls, field, spec) in yaml_settings().items() if "." not in name},
                    **{name: (model, model()) for name, model in _SECTIONS.items()})


class FinetuneSettings(_Top):
    def resolved(self, base: Path) -> "FinetuneSettings":
        """Relative paths made absolute against `base` (the YAML file's directory, or the cwd)."""
        def fix(value: str | None) -> str | None:
            return str((base / value).resolve()) if value else value

        update: dict[str, Any] = {}
        for dotted, (_, _, spec) in yaml_settings().items():
            if spec.path:
                section, _, key = dotted.rpartition(".")
                if not section:
                    update[key] = fix(getattr(self, key))
                else:
                    update.setdefault(section, {})[key] = fix(getattr(getattr(self, section), key))
        return self.model_copy(update={name: getattr(self, name).model_copy(update=value)
                                       if isinstance(value, dict) else value for name, value in update.items()})


def build(cls: type, section: BaseModel, from_env: bool = False, **extra: Any) -> Any:
    """`cls` made from the section's values of its settings (lists become tuples), with `extra`.
    from_env: a setting left empty is read from its environment variable (Setting.env), when set."""
    values = section.model_dump()
    kwargs: dict[str, Any] = {}
    types = field_types(cls)
    for field, spec in settings_of(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        if from_env and spec.env and value in (None, ""):
            value = _env_value(spec.env, unwrap(types[field.name])[0]) if os.environ.get(spec.env) else None
        kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs, **extra)


def _env_value(name: str, kind: type) -> Any:
    value = os.environ[name]
    if kind is not int:
        return value
    try:
        return int(value)
    except ValueError:
        raise JoraError(f"{name} must be a whole number, got {value!r}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" + (f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else "")


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """raw["train"]["lr"] = value for dotted "train.lr", making the sections it lacks (or left empty)."""
    section = raw
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate(parents, start=1):
        if section.get(part) is None:
            section[part] = {}
        section = section[part]
        if not isinstance(section, dict):  # "data.path.x": a key into a value, not into a section
            where = ".".join(parents[:depth])
            raise JoraError(f"cannot set {dotted}: {where} is a value ({type(section).__name__}), not a section")
    section[leaf] = value


def load_settings(path: Path, overrides: dict | None = None) -> FinetuneSettings:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise JoraError("settings file not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JoraError(f"not valid YAML{where}", path) from None
    if not isinstance(raw, dict):
        raise JoraError("expected a mapping of settings", path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    try:
        settings = FinetuneSettings.model_validate(raw)
    except ValidationError as exc:
        raise JoraError(_first_error(exc), path) from None
    return settings.resolved(path.parent.resolve())
