"""`jora run --demo` on a fresh work directory, then again (everything skipped)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from jora_model import load_model
from jora_model.tokenizer_files import tokenizer_vocab_size
from pipeline.cli import cli


def test_demo_runs_and_reruns_from_cache(tmp_path):
    first = CliRunner().invoke(cli, ["run", "--demo", "--workdir", str(tmp_path)], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "parameter store:" in first.stdout and "Hugging Face model:" in first.stdout and "\nA: " in first.stdout
    params = json.loads((tmp_path / "demo-source" / "params.json").read_text())
    assert params["vocab_size"] == -1  # written the way Llama-2's params.json is
    assert len(list((tmp_path / "demo-source").glob("consolidated.*.pth"))) == 2
    model = load_model(tmp_path / "store")
    assert model.config.vocab_size == tokenizer_vocab_size(tmp_path / "store" / "tokenizer.model")
    assert (model.config.dim, model.config.n_layers, model.config.n_kv_heads) == (128, 2, 2)

    second = CliRunner().invoke(cli, ["run", "--demo", "--workdir", str(tmp_path)], catch_exceptions=False)
    assert second.exit_code == 0
    assert second.stderr.count("skipped") == 6
    assert (tmp_path / "hf-model" / "config.json").is_file()
    assert (tmp_path / "peft-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter" / "adapter.safetensors").is_file() and "LoRA adapter:" in first.stdout
    assert (tmp_path / "tokenized" / "train").is_dir() and "examples in: 48" in first.stdout
