"""`jora run --demo` on a fresh work directory, then again (everything skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jora_model import load_model
from jora_model.data.tokenizer_files import tokenizer_vocab_size
from pipeline.demo import GOLDEN, QUESTION
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
    assert f"\nQ: {QUESTION}\nA: " in first.stdout  # a golden question, answered with its passages
    work = tmp_path / "w"
    params = json.loads((work / "demo-source" / "params.json").read_text())
    assert params["vocab_size"] == -1  # written the way Llama-2's params.json is
    assert len(list((work / "demo-source").glob("consolidated.*.pth"))) == 2
    model = load_model(work / "store")
    assert model.config.vocab_size == tokenizer_vocab_size(work / "store" / "tokenizer.model")
    assert (work / "hf-model" / "config.json").is_file() and (work / "peft-adapter" / "adapter_config.json").is_file()
    evals = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["loss"] < evals[0]["loss"]
    # the demo learns something real: it answers the golden set from the retrieved passages
    trained = json.loads((work / "evaluate" / "report.json").read_text())
    base = json.loads((work / "evaluate-base" / "report.json").read_text())
    assert trained["n"] == base["n"] == 50 and trained["data"] == str(GOLDEN)
    assert trained["exact_match"] >= 0.5 and base["exact_match"] <= 0.2, (trained, base)
    assert trained["no_context"]["exact_match"] <= trained["exact_match"] - 0.3  # the passages are what it reads
    assert (f"Golden set (50 questions), exact match: {trained['exact_match']:.2f} trained, "
            f"{trained['no_context']['exact_match']:.2f} trained without the passages, "
            f"{base['exact_match']:.2f} for the base model") in first.stdout.splitlines()

    outputs = ("demo-source", "store", "tokenized", "train", "merged", "hf-model", "peft-adapter")
    before = {name: file_identities(work / name) for name in outputs}
    # --set as --config takes it: the gate's tolerance is no stage's input, so nothing reruns
    second = subprocess.run([JORA, "run", "--demo", "--workdir", work, "--set", "eval.tolerance=0.05"],
                            capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped (up to date)") == 7  # all but evaluate-base, which the gate needs no more
    assert json.loads((work / "lineage.json").read_text())["runs"][-1]["settings"]["eval"]["tolerance"] == 0.05
    # skipped means skipped: no stage output (the demo's source included) was rebuilt or touched ...
    assert {name: file_identities(work / name) for name in outputs} == before
    # ... and no stage made a partial or work directory
    assert not [p.name for p in work.iterdir() if ".partial-" in p.name or ".work-" in p.name]


def test_llama3_demo_exports_what_transformers_and_peft_load(tmp_path):
    """`jora run --demo --family llama3`: a tiny Llama 3 in Meta's layout (tiktoken tokenizer.model,
    vocabulary-parallel embedding in 2 shards, scaled rotary, fewer KV heads) through every stage. The
    flow's exports check themselves against our logits; here transformers and peft load them too."""
    import os

    import numpy as np
    import peft
    import torch
    import transformers

    from jora_model.data.tokenizer import load_tokenizer
    from jora_model.data.tokenizer_files import TIKTOKEN, tokenizer_kind
    from stages.export import export

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    work = tmp_path / "w"
    run = subprocess.run([JORA, "run", "--demo", "--family", "llama3", "--workdir", work], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Hugging Face model:" in run.stdout and "\nA: " in run.stdout
    source = work / "demo-source"
    params = json.loads((source / "params.json").read_text())
    assert tokenizer_kind(source / "tokenizer.model") == TIKTOKEN
    assert params["use_scaled_rope"] and params["n_kv_heads"] < params["n_heads"]
    assert params["vocab_size"] == tokenizer_vocab_size(source / "tokenizer.model")  # written out, as Meta does
    shards = sorted(source.glob("consolidated.*.pth"))
    assert len(shards) == 2 and tuple(torch.load(shards[0], weights_only=True)["tok_embeddings.weight"].shape) == \
        (params["vocab_size"] // 2, params["dim"])  # split on the vocabulary rows
    for name in ("hf-model", "peft-adapter"):  # the flow's self-checks ran (a failed one stops the flow)
        assert "max_abs_diff" in json.loads((work / name / "jora-manifest.json").read_text())["facts"], name

    tokens = np.random.default_rng(0).integers(0, params["vocab_size"], size=(1, 64))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(work / "hf-model"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = load_model(work / "merged", dtype="float32").logits(tokens)
    assert np.abs(theirs - ours).max() < 1e-3 * max(1.0, float(np.abs(ours).max()))
    base = export(work / "store", tmp_path / "base", dtype="fp32", verify=False).out_dir
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(work / "peft-adapter"))
    with torch.no_grad():
        theirs = with_adapter.eval()(torch.as_tensor(tokens)).logits.numpy()
    ours = load_model(work / "store", dtype="float32", adapter=work / "train").logits(tokens)
    assert np.abs(theirs - ours).max() < 1e-3 * max(1.0, float(np.abs(ours).max()))

    tokenizer = load_tokenizer(work / "store")
    auto = transformers.AutoTokenizer.from_pretrained(str(work / "hf-model"))
    records = json.loads((Path(__file__).resolve().parents[1] / "data" / "sample_alpaca.json").read_text())
    for text in [r["output"] for r in records[:8]] + ["caf\u00e9 \U0001f50b 12345  \t\n\n x", "<|eot_id|> as text"]:
        assert auto(text, split_special_tokens=True)["input_ids"] == [tokenizer.bos_id] + tokenizer.encode(text)
    generation = json.loads((work / "hf-model" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(tokenizer.end_ids) and len(tokenizer.end_ids) == 3


def test_family_is_for_the_demo_only(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from tests.test_convert_stage import assert_clean_failure

    config = tmp_path / "run.yaml"
    config.write_text("workdir: w\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--family", "llama3"])
    assert_clean_failure(result, "--family")
    assert not (tmp_path / "w").exists()
