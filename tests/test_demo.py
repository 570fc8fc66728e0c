"""`jora run --demo` on a fresh work directory, then again (everything skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jora_model import load_model
from jora_model.data.tokenizer_files import tokenizer_vocab_size
from tests.test_convert_stage import file_identities

JORA = Path(sys.executable).with_name("jora")


def test_demo_runs_every_stage_then_skips_them(tmp_path):
    env_home = {"PREFECT_HOME": str(tmp_path / "prefect")}
    import os

    env = {**os.environ, **env_home}
    first = subprocess.run([JORA, "run", "--demo", "--workdir", tmp_path / "w"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("convert", "tokenize", "train", "merge", "export", "export-adapter"):
        assert f"{name} " in first.stdout and "ran" in first.stdout
    assert "Hugging Face model:" in first.stdout and "\nA: " in first.stdout
    work = tmp_path / "w"
    params = json.loads((work / "demo-source" / "params.json").read_text())
    assert params["vocab_size"] == -1  # written the way Llama-2's params.json is
    assert len(list((work / "demo-source").glob("consolidated.*.pth"))) == 2
    model = load_model(work / "store")
    assert model.config.vocab_size == tokenizer_vocab_size(work / "store" / "tokenizer.model")
    assert (work / "hf-model" / "config.json").is_file() and (work / "peft-adapter" / "adapter_config.json").is_file()
    evals = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["loss"] < evals[0]["loss"]  # the demo learns something

    outputs = ("demo-source", "store", "tokenized", "train", "merged", "hf-model", "peft-adapter")
    before = {name: file_identities(work / name) for name in outputs}
    second = subprocess.run([JORA, "run", "--demo", "--workdir", work], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped (up to date)") == 6
    # skipped means skipped: no stage output (the demo's source included) was rebuilt or touched ...
    assert {name: file_identities(work / name) for name in outputs} == before
    # ... and no stage made a partial or work directory
    assert not [p.name for p in work.iterdir() if ".partial-" in p.name or ".work-" in p.name]
