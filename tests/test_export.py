"""Merge, HF export, PEFT export and generation, each against code nobody here wrote.

Oracles: transformers' LlamaForCausalLM (fp32) on the exported directory, peft's PeftModel with the
exported adapter on the exported base, transformers' AutoTokenizer on the exported tokenizer, and
transformers' greedy generate. The adapter has r 8, alpha 32 and targets every linear layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import sentencepiece
import torch
import transformers
from click.testing import CliRunner

from jora_model import load_model
from jora_model.formats.adapter import save_adapter
from jora_model.model.generate import Generator, SamplingSettings
from jora_model.model.lora import LoraSettings, init_lora_params
from jora_model.formats.store import Store
from pipeline.cli import cli
from stages.export import export, export_adapter
from stages.merge import merge
from tests.test_convert_stage import assert_clean_failure
from tests.train_helpers import tiny_store

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("export")
    _, store = tiny_store(root, tokenizer_model, n_heads=4, n_kv_heads=2)
    config = Store(store).config
    lora = LoraSettings(r=8, alpha=32, targets=ALL)
    params = init_lora_params(config, lora, 0)
    rng = np.random.default_rng(1)
    for leaves in params.values():
        leaves["lora_b"] = rng.normal(0, 0.05, leaves["lora_b"].shape).astype(np.float32)
    save_adapter(root / "run" / "adapter", params, lora, config, "base")
    tokens = np.random.default_rng(2).integers(3, 320, size=(1, 20))
    ours = load_model(store, adapter=root / "run").logits(tokens)
    return root, store, root / "run", tokens, ours


def _hf(directory: Path):
    return transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def test_the_adapter_matters(setup):
    root, store, adapter, tokens, ours = setup
    assert np.abs(ours - load_model(store).logits(tokens)).max() > 0.1


def test_merged_store_equals_the_adapter(setup):
    root, store, adapter, tokens, ours = setup
    merged = merge(store, adapter, root / "merged", progress=False).out_dir
    merged_logits = load_model(merged).logits(tokens)
    # fp32: (W + s A B) x and W x + s B (A x) differ only in rounding order
    assert np.abs(merged_logits - ours).max() < 1e-5 * max(1.0, float(np.abs(ours).max()))
    assert Store(merged).dtype == Store(store).dtype
    assert merge(store, adapter, root / "merged").skipped


def test_hf_export_matches_ours_in_transformers(setup):
    root, store, adapter, tokens, ours = setup
    result = export(store, root / "hf", adapter=adapter, dtype="fp32", max_shard_bytes=100_000)
    out = result.out_dir
    assert result.manifest["facts"]["max_abs_diff"] < 1e-4
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    with torch.no_grad():
        theirs = _hf(out)(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(theirs - ours).max() < 1e-4


def test_bf16_export_keeps_bf16(setup):
    root, store, adapter, tokens, ours = setup
    out = export(store, root / "hf-bf16", adapter=adapter).out_dir
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16


def test_peft_adapter_on_the_exported_base(setup):
    root, store, adapter, tokens, ours = setup
    base = export(store, root / "hf-base", dtype="fp32").out_dir
    peft_dir = export_adapter(store, adapter, root / "peft").out_dir
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"]), config["use_rslora"]) == \
        (8, 32, sorted(ALL), False)
    model = peft.PeftModel.from_pretrained(_hf(base), str(peft_dir)).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(theirs - ours).max() < 1e-4


def test_peft_adapter_naming_a_bf16_base_of_an_fp32_store(setup):
    """--base-hf rounded to bf16: adapter_config.json names it, and the self-check (on a scratch fp32 base,
    since the rounded one differs from our weights) passes; AutoPeftModelForCausalLM loads it by that name."""
    root, store, adapter, tokens, ours = setup
    assert Store(store).dtype.name == "float32"
    base = export(store, root / "hf-base-bf16", verify=False).out_dir
    result = export_adapter(store, adapter, root / "peft-bf16", base_hf=base)
    assert result.manifest["facts"]["max_abs_diff"] < 1e-4
    assert json.loads((result.out_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base.resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(result.out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(theirs - ours).max() < 0.05 * max(1.0, float(np.abs(ours).max()))  # bf16 base weights
    assert export_adapter(store, adapter, root / "peft-bf16", base_hf=base).skipped


def test_exported_tokenizer_gives_our_ids(setup, tokenizer_model):
    root, store, adapter, tokens, ours = setup
    out = export(store, root / "hf-tok", dtype="fp32", verify=False).out_dir
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    for text in ["héllo wörld, €5 搬送ロボット 🔋", "literal </s> and <s> are text", "  tabs\tand  spaces ",
                 "### Response:\nyes", " leading", "line\n\nbreaks"]:
        assert theirs(text)["input_ids"] == [1] + sp.encode(text), text
        assert theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True) == text


def test_greedy_generation_equals_transformers(setup):
    root, store, adapter, tokens, ours = setup
    out = export(store, root / "hf-gen", adapter=adapter, dtype="fp32", verify=False).out_dir
    prompt = [1] + tokens[0, :10].tolist()
    mine = Generator(load_model(store, adapter=adapter)).generate(prompt, SamplingSettings(max_new_tokens=24),
                                                                  eos_id=None)
    theirs = _hf(out).generate(torch.as_tensor([prompt]), max_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert mine == theirs


def test_generate_command(setup):
    root, store, adapter, tokens, ours = setup
    result = CliRunner().invoke(cli, ["generate", "--model", str(store), "--adapter", str(adapter), "--prompt",
                                      "check the battery", "--max-new-tokens", "5"], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.strip()


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_adapter_for_another_model_is_refused(setup, tmp_path, tokenizer_model):
    root, store, adapter, tokens, ours = setup
    _, other = tiny_store(tmp_path, tokenizer_model, n_heads=8, n_kv_heads=8, dim=128)
    assert_clean_failure(_invoke("merge", "--model", other, "--adapter", adapter, tmp_path / "m"), "another shape")
    assert_clean_failure(_invoke("export", other, tmp_path / "e", "--adapter", adapter), "another shape")
    broken = tmp_path / "broken"
    shutil.copytree(adapter / "adapter", broken)
    meta = json.loads((broken / "adapter.json").read_text())
    meta["lora"]["targets"] = ["q_proj", "qkv_proj"]
    (broken / "adapter.json").write_text(json.dumps(meta))
    assert_clean_failure(_invoke("export-adapter", "--model", store, broken, tmp_path / "p"), "qkv_proj",
                         str(broken / "adapter.json"))
    assert not any((tmp_path / n).exists() for n in ("m", "e", "p"))


def test_store_without_tokenizer_and_existing_output(setup, tmp_path):
    root, store, adapter, tokens, ours = setup
    bare = tmp_path / "bare"
    shutil.copytree(store, bare)
    index = json.loads((bare / "store.json").read_text())
    index["tokenizer"] = None
    (bare / "store.json").write_text(json.dumps(index))
    (bare / "jora-manifest.json").unlink()
    assert_clean_failure(_invoke("export", bare, tmp_path / "e"), "no SentencePiece tokenizer")
    assert not (tmp_path / "e").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert_clean_failure(_invoke("export", store, tmp_path / "taken"), "not made by jora")


def test_failed_self_check_leaves_nothing(setup, tmp_path, monkeypatch):
    root, store, adapter, tokens, ours = setup
    import jora_model.formats.hf_export as hf_export

    real = hf_export.hf_logits
    monkeypatch.setattr(hf_export, "hf_logits", lambda *a, **k: real(*a, **k) + 0.5)  # a wrong export
    assert_clean_failure(_invoke("export", store, tmp_path / "e", "--adapter", adapter), "self-check failed")
    assert_clean_failure(_invoke("export-adapter", "--model", store, adapter, tmp_path / "p"), "self-check failed")
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
