"""Each setting is defined once, on the dataclass that owns it (jora_model.schema). The command options,
the YAML sections, the GUI form, pipeline/finetune.example.yaml and README's "Every setting" table are
checked against those definitions here; each checker returns the names that disagree, and is shown to
catch a doctored copy."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from jora_model.errors import JoraError
from jora_model.model.lora import LoraSettings
from jora_model.schema import field_types, settings_of, spec_of
from jora_model.training.bench import BenchSettings
from jora_model.training.settings import TrainSettings
from pipeline.cli import cli
from pipeline.gui.form import form_fields
from pipeline.settings import LAYOUT, NOT_IN_YAML, FinetuneSettings, load_settings, yaml_settings
from stages.convert import ConvertSettings
from stages.export import ExportSettings
from stages.options import option_name
from stages.tokenize import TokenizeSettings
from stages.train import HostSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "pipeline" / "finetune.example.yaml"
README = ROOT / "README.md"
# Which command's options each settings dataclass defines (besides the command's own inputs).
COMMANDS = ((TrainSettings, "train"), (LoraSettings, "train"), (HostSettings, "train"), (TokenizeSettings, "tokenize"),
            (ConvertSettings, "convert"), (ExportSettings, "export"), (BenchSettings, "bench"))
EXAMPLE_PATHS = ("workdir", "model.checkpoint", "data.path")  # the example shows a real path, not the default


def _same(value, default) -> bool:
    def norm(v):
        return list(v) if isinstance(v, tuple) else (None if v == "" else v)
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    return norm(value) == norm(default)


# --- the checkers ----------------------------------------------------------------------------------
def option_mismatches(cls, command: click.Command) -> list[str]:
    """Settings of `cls` that `command` lacks as an option, or offers with another default or choices."""
    options = {decl: p for p in command.params if isinstance(p, click.Option) for decl in p.opts}
    wrong = []
    for field, spec in settings_of(cls):
        if not spec.cli:
            continue
        option = options.get(option_name(field, spec))
        default = ",".join(field.default) if isinstance(field.default, tuple) else field.default
        if isinstance(default, int) and not isinstance(default, bool):
            default //= spec.unit
        if option is None or option.default != default or (
                spec.choices is not None and isinstance(option.type, click.Choice)
                and tuple(option.type.choices) != spec.choices):
            wrong.append(field.name)
    return wrong


def model_mismatches(model=FinetuneSettings) -> list[str]:
    """YAML names missing from the pydantic model or holding another default there, and the model's
    fields that no setting defines."""
    def dotted(m, prefix=""):
        for name, info in m.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                yield from dotted(info.annotation, f"{prefix}{name}.")
            else:
                yield prefix + name, info.default
    ours = dict(dotted(model))
    schema = yaml_settings()
    wrong = [name for name, (_, field, _) in schema.items() if name not in ours or not _same(ours[name], field.default)]
    return wrong + [name for name in ours if name not in schema]


def form_mismatches(fields) -> list[str]:
    """YAML names the GUI form lacks, shows with another default, or has beyond the schema."""
    shown = {f.name: f for f in fields}
    schema = yaml_settings()
    wrong = []
    for name, (_, field, spec) in schema.items():
        f = shown.get(name)
        default = None if f is not None and f.default == "" else (f.default if f is not None else None)
        if f is None or not _same(default, field.default) or (spec.choices and tuple(f.choices) != spec.choices):
            wrong.append(name)
    return wrong + [name for name in shown if name not in schema]


def example_mismatches(text: str) -> list[str]:
    """YAML names the example file lacks, leaves uncommented, or shows with another default."""
    loaded = yaml.safe_load(text)
    lines = {}
    section = ""
    for line in text.splitlines():
        match = re.match(r"^(\s*)([A-Za-z_]+):", line)
        if match:
            section = match.group(2) if not match.group(1) else section
            lines[match.group(2) if not match.group(1) else f"{section}.{match.group(2)}"] = line
    wrong = []
    for name, (_, field, _) in yaml_settings().items():
        section, _, key = name.rpartition(".")
        holder = loaded.get(section, {}) if section else loaded
        if key not in holder or "#" not in lines.get(name, "") or (
                name not in EXAMPLE_PATHS and not _same(holder[key], field.default)):
            wrong.append(name)
    return wrong


def readme_rows(text: str) -> dict[str, str]:
    """README's "Every setting" table: setting -> its default cell."""
    table = text.split("## Every setting", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = line.split("|")
        if line.startswith("| `") and len(cells) >= 4:
            rows[cells[1].strip().strip("`")] = cells[2].strip()
    return rows


def _readme_value(cell: str):
    text = cell.strip("`").strip()
    if not text:
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return value
    return value


def readme_mismatches(text: str) -> list[str]:
    """YAML names without a row in README's table, rows with another default, and rows of no setting."""
    rows = readme_rows(text)
    schema = yaml_settings()
    wrong = [name for name, (_, field, _) in schema.items()
             if name not in rows or not _same(_readme_value(rows[name]), field.default)]
    return wrong + [name for name in rows if name not in schema]


def unplaced() -> list[str]:
    """Settings of the YAML's dataclasses that neither a YAML key nor NOT_IN_YAML accounts for."""
    placed = {(cls, field.name) for cls, field, _ in yaml_settings().values()}
    classes = {cls for parts in LAYOUT.values() for cls, _ in parts}
    return [f"{cls.__name__}.{field.name}" for cls in classes for field, _ in settings_of(cls)
            if (cls, field.name) not in placed and (cls, field.name) not in NOT_IN_YAML]


# --- every consumer agrees -------------------------------------------------------------------------
@pytest.mark.parametrize("cls,command", COMMANDS, ids=[f"{c.__name__}-{n}" for c, n in COMMANDS])
def test_every_setting_is_an_option_of_its_command(cls, command):
    assert option_mismatches(cls, cli.commands[command]) == []


def test_yaml_model_form_example_and_readme_follow_the_schema():
    assert "train.kernels" in yaml_settings()
    assert model_mismatches() == []
    assert form_mismatches(form_fields()) == []
    assert example_mismatches(EXAMPLE.read_text()) == []
    assert readme_mismatches(README.read_text()) == []
    assert unplaced() == []


def test_the_checkers_catch_a_doctored_copy():
    readme = README.read_text()
    without_row = "\n".join(line for line in readme.splitlines() if not line.startswith("| `train.kernels`"))
    assert readme_mismatches(without_row) == ["train.kernels"]
    other_default = readme.replace("| `train.lr` | 1e-4 |", "| `train.lr` | 2e-4 |")
    assert other_default != readme and readme_mismatches(other_default) == ["train.lr"]
    stray = readme.replace("| `train.lr` |", "| `train.learning_rate` | 1 | x |\n| `train.lr` |")
    assert readme_mismatches(stray) == ["train.learning_rate"]

    example = EXAMPLE.read_text()
    assert example_mismatches(re.sub(r"\n  kernels:[^\n]*", "", example)) == ["train.kernels"]
    assert example_mismatches(example.replace("  epochs: 7 ", "  epochs: 8 ")) == ["train.epochs"]

    fields = [f for f in form_fields() if f.name != "lora.rslora"]
    assert form_mismatches(fields) == ["lora.rslora"]

    train = cli.commands["train"]
    fewer = click.Command("train", params=[p for p in train.params if "--kernels" not in p.opts])
    assert option_mismatches(TrainSettings, fewer) == ["kernels"]


def test_one_definition_one_check_everywhere(tmp_path):
    """A value outside a setting's bounds is refused by the dataclass, the YAML and the command line alike."""
    with pytest.raises(JoraError, match="kernels must be one of auto, cpu, portable, got 'gpu'"):
        TrainSettings(kernels="gpu")
    with pytest.raises(JoraError, match="LoRA dropout must be in"):
        LoraSettings(dropout=1.0)
    with pytest.raises(JoraError, match="checkpoint_every must be at least 1"):
        TrainSettings(checkpoint_every=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  kernels: gpu\n")
    with pytest.raises(JoraError, match="train.kernels"):
        load_settings(bad)
    result = CliRunner().invoke(cli, ["train", "--model", "m", "--data", "d", "out", "--kernels", "gpu"])
    assert result.exit_code == 2 and "--kernels" in result.output
    assert load_settings(EXAMPLE, {"train.kernels": "portable"}).train.kernels == "portable"


def test_the_flow_builds_the_library_settings_from_the_sections():
    from pipeline.flow import train_settings

    settings = FinetuneSettings.model_validate({"data": {"max_seq_len": 512}, "lora": {"r": 4, "targets": ["v_proj"]},
                                                "train": {"lr": 3e-4, "kernels": "portable", "remat": False}})
    built = train_settings(settings)
    assert built == TrainSettings(lora=LoraSettings(r=4, targets=("v_proj",)), lr=3e-4, max_seq_len=512,
                                  kernels="portable", remat="none")
    assert train_settings(FinetuneSettings()) == TrainSettings()


def test_same_as_shares_the_definition():
    bench = {f.name: f for f in dataclasses.fields(BenchSettings)}
    train = {f.name: f for f in dataclasses.fields(TrainSettings)}
    for name in ("kernels", "remat", "compute_dtype", "mesh"):
        assert spec_of(bench[name]) == spec_of(train[name]) and bench[name].default == train[name].default
    assert field_types(BenchSettings)["kernels"] is str


def test_kernels_reach_plan_and_bench(monkeypatch):
    import jora_model.training.bench as bench
    import jora_model.training.memory_plan as memory_plan

    seen = {}

    def spy(*args, **kwargs):  # what the plan was asked for is all this test needs
        seen["kernels"] = kwargs.get("kernels")
        raise JoraError("planned")

    monkeypatch.setattr(memory_plan, "plan_memory", spy)
    for given, planned in (("portable", "portable"), ("auto", "cpu")):
        out = CliRunner().invoke(cli, ["plan", "--preset", "7B", "--seq", "512", "--kernels", given])
        assert out.exit_code == 2 and "planned" in out.output, out.output
        assert seen["kernels"] == planned
    monkeypatch.setattr(memory_plan, "meshes_that_fit", spy)
    out = CliRunner().invoke(cli, ["plan", "--preset", "7B", "--kernels", "portable", "--devices", "8",
                                   "--device-memory", "80GB"])
    assert out.exit_code == 2 and seen["kernels"] == "portable", out.output
    monkeypatch.setattr(bench, "run_bench", lambda settings: {"kernels": settings.kernels,
                                                              "lora": [settings.lora.r, settings.lora.alpha]})
    out = CliRunner().invoke(cli, ["bench", "--kernels", "portable", "--lora-r", "8"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"kernels": "portable", "lora": [8, 8]}
