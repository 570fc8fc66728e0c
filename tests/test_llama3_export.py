"""Exporting Llama 3 stores (a tiktoken tokenizer.model, or an HF tokenizer.json) as Hugging Face directories.

Oracles: tiktoken's own Encoding built with Meta's pattern and specials (test_tokenizers.meta_encoding),
the `tokenizers` library reading the source tokenizer.json, transformers' AutoTokenizer and
LlamaForCausalLM on the exported directory. The checkpoint is a tiny random Llama 3 in Meta's layout: two
shards with the embedding split on its rows, fewer KV heads than query heads, Llama 3.1's scaled rotary.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from jora_model import load_model
from jora_model.data.tokenizer import load_tokenizer
from jora_model.errors import JoraError
from jora_model.formats import hf_export, hf_tokenizer_export
from pipeline.cli import cli
from stages.convert import ConvertSettings, convert
from stages.export import export
from tests.test_convert_stage import assert_clean_failure
from tests.test_tokenizers import _ranks, meta_encoding, write_ranks

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>")
TEXTS = [
    "Below is an instruction that describes a task.\n\n### Instruction:\nWrite the thing's name",
    "digits 1234567 and 45 and 007 and 3.14159", "whitespace runs:   three, \t\ttabs, \n\n\n newlines  ",
    "unicode: caf\u00e9 \u00fcber \u65e5\u672c\u8a9e \U0001f600 \u0645\u0631\u062d\u0628\u0627 e\u0301",
    "ALL CAPS'S 'LL it's we'Ve", "  leading and trailing  ", "a\r\nb\r\n\r\nc", "x" * 50, " the and ing",
    "emoji \U0001f50b\U0001f916 and \u20ac5", "plain text <|eot_id|> and <|begin_of_text|><|end_of_text|> stay text",
]
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def llama3_ranks() -> dict[bytes, int]:
    """The tiny ranks of test_tokenizers plus one merge, so ranks + 256 specials split over two shards."""
    ranks = _ranks()
    ranks.setdefault(b" thes", len(ranks))  # " the" + "s"
    assert (len(ranks) + 256) % 2 == 0
    return ranks


def meta_llama3(root, tokenizer, vocab: int):
    """A random Llama 3.1-style checkpoint in Meta's layout, 2 shards, scaled rotary."""
    from tests.oracles.checkpoints import hf_to_meta_state_dict, meta_params, random_hf_llama_from_meta, \
        write_meta_checkpoint

    params = meta_params(64, 2, 4, 2, 32, rope_theta=500000.0)
    hf = random_hf_llama_from_meta(params, vocab, seed=3)
    state = hf_to_meta_state_dict(hf.state_dict(), params["n_heads"], params["n_kv_heads"], rope_theta=500000.0)
    src = write_meta_checkpoint(root / "meta", state, params, 2, tokenizer, llama3=True)
    written = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**written, "use_scaled_rope": True}))
    return src


@pytest.fixture(scope="module")
def tiktoken_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3")
    ranks = llama3_ranks()
    tokenizer = write_ranks(root / "tokenizer.model", ranks)
    src = meta_llama3(root, tokenizer, len(ranks) + 256)
    store = convert(src, root / "store", ConvertSettings(dtype="fp32"), progress=False).out_dir
    assert load_model(store).config.rope_scaling_factor == 8.0
    result = export(store, root / "hf", dtype="fp32")
    return ranks, store, result


def test_tiktoken_store_exports_a_tokenizer_that_gives_our_ids(tiktoken_export):
    ranks, store, result = tiktoken_export
    out = result.out_dir
    oracle = meta_encoding(ranks)
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    bos = oracle.encode_single_token("<|begin_of_text|>")
    for text in TEXTS:
        ids = oracle.encode(text, disallowed_special=())
        assert theirs(text, split_special_tokens=True)["input_ids"] == [bos] + ids, text
        if "<|" not in text:
            assert theirs(text)["input_ids"] == [bos] + ids, text
        assert theirs.decode([bos] + ids, skip_special_tokens=True) == text
    # transformers' default keeps Meta's HF behaviour: a chat template's markers are the special tokens
    assert theirs("<|eot_id|>")["input_ids"] == [bos, oracle.encode_single_token("<|eot_id|>")]
    assert (theirs.bos_token, theirs.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert "tokenizer.model" not in {p.name for p in out.iterdir()}  # no SentencePiece file for slow tokenizers


def test_generation_config_lists_every_end_token(tiktoken_export):
    ranks, store, result = tiktoken_export
    oracle = meta_encoding(ranks)
    generation = json.loads((result.out_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == oracle.encode_single_token("<|begin_of_text|>")
    assert generation["eos_token_id"] == [oracle.encode_single_token(t) for t in
                                          ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")]
    loaded = transformers.GenerationConfig.from_pretrained(str(result.out_dir))
    assert loaded.eos_token_id == generation["eos_token_id"]
    model_config = transformers.AutoConfig.from_pretrained(str(result.out_dir))  # config.json says the same
    assert (model_config.bos_token_id, model_config.eos_token_id) == (generation["bos_token_id"], generation["eos_token_id"])


def test_exported_llama3_logits_equal_ours(tiktoken_export):
    ranks, store, result = tiktoken_export
    assert result.manifest["facts"]["max_abs_diff"] < 1e-4  # the export's own check, on 256 tokens
    assert len(hf_export.verify_tokens(len(ranks) + 256)) >= 256
    tokens = np.random.default_rng(5).integers(0, len(ranks) + 256, size=(1, 300))
    model = transformers.LlamaForCausalLM.from_pretrained(str(result.out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = load_model(store).logits(tokens)
    assert np.abs(theirs - ours).max() < 1e-4 * max(1.0, float(np.abs(ours).max()))


def _self_check_error(store, out) -> float:
    with pytest.raises(JoraError, match="self-check failed") as err:
        export(store, out, dtype="fp32")
    assert not out.exists()
    return float(re.search(r"differs from jora's own model by ([0-9.e+-]+)", str(err.value)).group(1))


def test_the_self_check_sees_missing_rotary_scaling(tiktoken_export, tmp_path, monkeypatch):
    """The deliberate bug: config.json without Llama 3.1's rotary scaling. Only frequencies with
    wavelengths beyond 2048 positions change, so the first positions barely move: 256 tokens show it
    far more clearly than the old 24."""
    ranks, store, result = tiktoken_export
    monkeypatch.setattr(hf_export, "hf_rope", lambda config: {"rope_type": "default", "rope_theta": config.rope_theta})
    assert_clean_failure(CliRunner().invoke(cli, ["export", str(store), str(tmp_path / "e"), "--dtype", "fp32"]),
                         "self-check failed")
    long = _self_check_error(store, tmp_path / "e")
    monkeypatch.setattr(hf_export, "VERIFY_TOKENS", 24)
    short = _self_check_error(store, tmp_path / "e")
    assert long > 5 * short, (long, short)


@pytest.mark.parametrize("bug", ["wrong split pattern", "no byte-level alphabet"])
def test_a_wrong_tokenizer_export_fails_its_check(bug, tmp_path, monkeypatch):
    tokenizer = write_ranks(tmp_path / "tokenizer.model", llama3_ranks())
    out = tmp_path / "out"
    out.mkdir()
    hf_tokenizer_export.export_llama3_tokenizer(tokenizer, out)
    hf_tokenizer_export.check_llama3_tokenizer(out, tokenizer)  # the right export passes
    if bug == "wrong split pattern":
        real = hf_tokenizer_export.tiktoken_spec

        def gpt2_split(path):
            spec = real(path)
            spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = GPT2_PATTERN
            return spec

        monkeypatch.setattr(hf_tokenizer_export, "tiktoken_spec", gpt2_split)
    else:  # token bytes spelled as latin-1, not in GPT-2's alphabet that ByteLevel maps text into
        monkeypatch.setattr(hf_tokenizer_export, "bytes_to_unicode", lambda: {b: chr(b) for b in range(256)})
    hf_tokenizer_export.export_llama3_tokenizer(tokenizer, out)
    with pytest.raises(JoraError, match="disagrees with ours"):
        hf_tokenizer_export.check_llama3_tokenizer(out, tokenizer)


@pytest.fixture(scope="module")
def hf_json_store(tmp_path_factory):
    """An HF Llama 3 instruct directory: tokenizer.json (byte-level BPE without a bos post-processor) and a
    tokenizer_config.json whose eos is "<|eot_id|>"."""
    from tokenizers import Tokenizer as HFLib, decoders, models, pre_tokenizers, trainers

    from tests.oracles.checkpoints import random_hf_llama, write_hf_dir

    root = tmp_path_factory.mktemp("hfjson")
    lib = HFLib(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lib.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lib.train_from_iterator(TEXTS * 5, trainer)
    src = write_hf_dir(random_hf_llama(lib.get_vocab_size(), 64, 2, 4, 2, 96, seed=4), root / "src")
    lib.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "{{ messages }}"}))
    store = convert(src, root / "store", ConvertSettings(dtype="fp32"), progress=False).out_dir
    return src, store, root


def test_store_keeps_the_tokenizer_config_and_its_eos(hf_json_store, tmp_path):
    src, store, root = hf_json_store
    assert json.loads((store / "tokenizer_config.json").read_text())["eos_token"] == "<|eot_id|>"
    tok = load_tokenizer(store)
    assert tok.piece(tok.eos_id) == "<|eot_id|>" and tok.piece(tok.bos_id) == "<|begin_of_text|>"
    # the file is among convert's inputs: editing it converts again
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    first = convert(copy, tmp_path / "store", ConvertSettings(dtype="fp32"), progress=False)
    (copy / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    second = convert(copy, tmp_path / "store", ConvertSettings(dtype="fp32"), progress=False)
    assert not second.skipped and second.manifest["key"] != first.manifest["key"]
    assert load_tokenizer(tmp_path / "store").piece(load_tokenizer(tmp_path / "store").eos_id) == "<|end_of_text|>"


def test_hf_json_store_exports_a_tokenizer_that_gives_our_ids(hf_json_store):
    from tokenizers import Tokenizer as HFLib

    src, store, root = hf_json_store
    out = export(store, root / "hf", dtype="fp32").out_dir
    oracle = HFLib.from_file(str(src / "tokenizer.json"))
    oracle.encode_special_tokens = True
    bos = oracle.token_to_id("<|begin_of_text|>")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        ids = oracle.encode(text, add_special_tokens=False).ids
        assert theirs(text, split_special_tokens=True)["input_ids"] == [bos] + ids, text
        if "<|" not in text:
            assert theirs(text)["input_ids"] == [bos] + ids, text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["chat_template"]) == ("<|eot_id|>", "{{ messages }}")
    ends = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert ends[0] == oracle.token_to_id("<|eot_id|>") and set(ends) == {oracle.token_to_id(t) for t in SPECIALS[1:4]}


def test_garbage_tokenizer_model_is_refused_by_convert(hf_json_store, tmp_path):
    src, store, root = hf_json_store
    for content, expected in ((b"\x00\x01\x02 not a model", "not a SentencePiece model nor a tiktoken ranks file"),
                              (b"QUJD 0\nnot a rank\n", "line 2")):
        bad = tmp_path / "tokenizer.model"
        bad.write_bytes(content)
        result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out"), "--tokenizer", str(bad)])
        assert_clean_failure(result, str(bad), expected)
        assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
