"""The pipeline's settings: the shipped example documents every field and loads; errors name the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from jora_model.errors import JoraError
from pydantic import BaseModel

from pipeline.settings import FinetuneSettings, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "pipeline" / "finetune.example.yaml"


def _fields(model, prefix=""):
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_example_documents_every_field_with_its_default():
    text = EXAMPLE.read_text()
    loaded = load_settings(EXAMPLE)
    defaults = FinetuneSettings()
    for dotted in _fields(defaults):
        leaf = dotted.rsplit(".", 1)[-1]
        assert f"{leaf}:" in text, f"{dotted} is not in the example file"
        section = dotted.rpartition(".")[0]
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{section}:")) + 1 if section else 0
        # the leaf's line in its own section: "data:" is both a section and eval's golden set
        line = next(line for line in lines[start:] if line.strip().startswith(f"{leaf}:")
                    and (not section or line.startswith(" ")))
        assert "#" in line, f"{dotted} has no comment"
        section, _, name = dotted.rpartition(".")
        ours = getattr(getattr(loaded, section) if section else loaded, name)
        default = getattr(getattr(defaults, section) if section else defaults, name)
        if dotted not in ("workdir", "model.checkpoint", "data.path"):
            assert ours == default, (dotted, ours, default)
    assert Path(loaded.data.path).is_absolute() and loaded.data.path.startswith(str(EXAMPLE.parent))


def test_overrides_and_errors(tmp_path):
    assert load_settings(EXAMPLE, {"train.lr": 2e-4, "lora.r": 8}).train.lr == 2e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    with pytest.raises(JoraError, match="train.lr") as info:
        load_settings(bad)
    assert str(bad) in str(info.value)
    bad.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(JoraError, match="learning_rate"):
        load_settings(bad)
    bad.write_text("train: [\n")
    with pytest.raises(JoraError, match="not valid YAML at line"):
        load_settings(bad)


def test_remat_reads_the_policies_and_the_old_booleans(tmp_path):
    path = tmp_path / "f.yaml"
    for written, read in (("layer", "layer"), ("true", "matmuls"), ("false", "none")):
        path.write_text(f"train:\n  remat: {written}\n")
        assert load_settings(path).train.remat == read
    path.write_text("train:\n  remat: sometimes\n")
    with pytest.raises(JoraError, match="train.remat"):
        load_settings(path)
