"""The three tokenizer kinds behind load_tokenizer, each checked against the library that defines it.

Oracles: tiktoken's own `Encoding` built directly with Meta's split pattern and special tokens (Meta's
llama-models tokenizer.py builds it the same way), and `tokenizers.Tokenizer.from_file`. SentencePiece
keeps its own tests (test_tokenize.py, test_tokenizer_words.py). The tiny ranks file here is the 256
single bytes plus merges of a few words: enough for multi-byte tokens, digits, newlines and unicode.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from jora_model.data.alpaca import render_prompt
from jora_model.data.tiktoken_file import TiktokenTokenizer
from jora_model.data.tokenizer import Tokenizer, load_tokenizer
from jora_model.data.tokenizer_files import tokenizer_vocab_size
from jora_model.errors import JoraError
from pipeline.cli import cli
from stages.tokenize import TokenizeSettings, tokenize
from tests.test_convert_stage import assert_clean_failure

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = [" the", " and", "ing", " instruction", " response", "Below", "###", "\n\n", ":\n", "123", "45",
         " caf\u00e9", " \u00fcber", "\u65e5\u672c", " <|", "|>", "eot", "_id", "'s", " Write", " task"]
TEXTS = [
    "Below is an instruction that describes a task.\n\n### Instruction:\nWrite the thing's name",
    "digits 1234567 and 45 and 007\r\n\ttabs\t\tand  doubled   spaces ",
    "unicode: caf\u00e9 \u00fcber \u65e5\u672c\u8a9e \U0001f600 \u0645\u0631\u062d\u0628\u0627 e\u0301",
    "plain text <|eot_id|> and <|begin_of_text|><|end_of_text|> stay text\n\n",
    "", " ", "\n", "ALL CAPS'S 'LL", "x" * 50,
]
SPECIAL_NAMES = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def _ranks() -> dict[bytes, int]:
    """Single bytes in a shuffled order (Meta's file is not in byte order either), then every prefix of
    each word, so each merge joins two tokens that exist already."""
    order = np.random.default_rng(0).permutation(256)
    ranks = {bytes([int(b)]): i for i, b in enumerate(order)}
    for word in WORDS:
        data = word.encode("utf-8")
        for end in range(2, len(data) + 1):
            ranks.setdefault(data[:end], len(ranks))
    return ranks


def write_ranks(path, ranks: dict[bytes, int]):
    lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda t: t[1]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    return write_ranks(tmp_path_factory.mktemp("tiktoken") / "tokenizer.model", _ranks())


def meta_encoding(ranks: dict[bytes, int]):
    """The oracle: built as Meta's tokenizer.py builds it, from names written out here independently."""
    import tiktoken

    names = SPECIAL_NAMES + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(SPECIAL_NAMES))]
    specials = {name: len(ranks) + i for i, name in enumerate(names)}
    return tiktoken.Encoding(name="oracle", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def check_against_oracle(tok, oracle_encode, special_ids: set[int]) -> None:
    for text in TEXTS:
        ours = tok.encode_array(text)
        assert ours.dtype == np.int32 and ours.tolist() == tok.encode(text) == oracle_encode(text), text
        assert not special_ids & set(ours.tolist()), text  # "<|eot_id|>" in a record stays text
        assert tok.decode(ours.tolist()) == text
    assert tok.encode_batch(TEXTS) == [oracle_encode(t) for t in TEXTS]


def test_tiktoken_ids_equal_tiktoken_itself(ranks_file):
    ranks = _ranks()
    oracle = meta_encoding(ranks)
    tok = load_tokenizer(ranks_file)
    assert isinstance(tok, TiktokenTokenizer) and not tok.word_cached
    assert tok.bos_id == len(ranks) == oracle.encode_single_token("<|begin_of_text|>")
    assert tok.eos_id == len(ranks) + 1
    assert tok.vocab_size == len(ranks) + 256 == tokenizer_vocab_size(ranks_file) == oracle.n_vocab
    assert oracle.encode_single_token("<|eot_id|>") == len(ranks) + 9
    assert tok.end_ids == tuple(oracle.encode_single_token(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"))
    assert oracle.encode_single_token("<|reserved_special_token_246|>") == len(ranks) + 255
    assert len(tok.encode(" the")) == 1 and len(tok.encode("123")) == 1  # the merges are used
    specials = set(range(len(ranks), len(ranks) + 256))
    check_against_oracle(tok, lambda t: oracle.encode(t, allowed_special=set(), disallowed_special=()), specials)


def test_parsing_special_tokens_from_text_fails_the_check(ranks_file, monkeypatch):
    """The deliberate bug: special tokens parsed out of a record's text."""
    ranks = _ranks()
    oracle = meta_encoding(ranks)
    tok = load_tokenizer(ranks_file)
    monkeypatch.setattr(tok, "encode_array", lambda text: np.asarray(
        tok._enc.encode(text, allowed_special="all"), dtype=np.int32))
    monkeypatch.setattr(tok, "encode", lambda text: tok._enc.encode(text, allowed_special="all"))
    with pytest.raises(AssertionError):
        check_against_oracle(tok, lambda t: oracle.encode(t, disallowed_special=()),
                             set(range(len(ranks), len(ranks) + 256)))


def test_tiktoken_cut_point_never_splits_a_character(ranks_file):
    tok = load_tokenizer(ranks_file)
    text = "caf\u00e9 \U0001f600 \u65e5\u672c\u8a9e 12345"
    ids = tok.encode(text)
    for keep in range(len(ids) + 2):
        cut = tok.cut_point(text, keep)
        kept = tok._enc.decode_bytes(ids[:keep])
        # the whole characters of the first `keep` tokens: at most a character cut short is left out
        assert kept.startswith(text[:cut].encode()) and len(kept) - len(text[:cut].encode()) < 4
    assert tok.cut_point(text, len(ids)) == len(text) and tok.cut_point(text, 0) == 0


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    from tokenizers import Tokenizer as HFLib, decoders, models, pre_tokenizers, trainers

    lib = HFLib(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lib.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>",
                                                                  "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lib.train_from_iterator(TEXTS * 5 + WORDS * 5, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    lib.save(str(path))
    return path


def test_hf_tokenizer_json_ids_equal_the_tokenizers_library(hf_json):
    from tokenizers import Tokenizer as HFLib

    oracle = HFLib.from_file(str(hf_json))
    oracle.encode_special_tokens = True
    tok = load_tokenizer(hf_json)
    assert not isinstance(tok, Tokenizer) and not tok.word_cached
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.vocab_size == oracle.get_vocab_size() == \
        tokenizer_vocab_size(hf_json)
    check_against_oracle(tok, lambda t: oracle.encode(t, add_special_tokens=False).ids, {0, 1, 2})
    # the file's own special-token parsing would have made "<|eot_id|>" id 2: the check above is not vacuous
    assert 2 in HFLib.from_file(str(hf_json)).encode(TEXTS[3]).ids


def test_hf_tokenizer_config_decides_eos(hf_json, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(hf_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>",
                                                                "bos_token": {"content": "<|begin_of_text|>"}}))
    assert (load_tokenizer(path).bos_id, load_tokenizer(path).eos_id) == (0, 2)
    assert load_tokenizer(path).end_ids[0] == 2 and set(load_tokenizer(path).end_ids) == {1, 2}  # eos first
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(JoraError, match="no eos token"):
        load_tokenizer(path)


def test_hf_cut_point_stays_within_the_first_tokens(hf_json):
    from tokenizers import Tokenizer as HFLib

    oracle = HFLib.from_file(str(hf_json))
    tok = load_tokenizer(hf_json)
    text = TEXTS[2]
    offsets = oracle.encode(text, add_special_tokens=False).offsets
    cuts = [tok.cut_point(text, keep) for keep in range(len(offsets) + 1)]
    assert cuts == sorted(cuts) and cuts[0] == 0 and cuts[-1] == len(text)
    assert all(cut <= offsets[keep - 1][1] for keep, cut in enumerate(cuts) if keep)


@pytest.mark.parametrize("content", [b"this is not a tokenizer", b"\x00\x01\x02garbage", b"QUJD 0\nnot a rank\n"])
def test_garbage_tokenizer_model_is_one_line(content, tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(JoraError) as err:
        tokenizer_vocab_size(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    result = CliRunner().invoke(cli, ["tokenize", str(data), str(tmp_path / "out"), "--tokenizer", str(bad)],
                                catch_exceptions=False)
    expected = "line 2" if content.startswith(b"QUJD") else "not a SentencePiece model nor a tiktoken ranks file"
    assert_clean_failure(result, str(bad), expected)


def test_sentencepiece_class_refuses_the_other_kinds(ranks_file, tokenizer_model):
    with pytest.raises(JoraError, match="SentencePiece model is needed"):
        Tokenizer(ranks_file)
    assert isinstance(load_tokenizer(tokenizer_model), Tokenizer)


def test_tokenize_stage_with_the_tiktoken_file(ranks_file, tmp_path):
    records = [{"instruction": f"Write {i} things about <|eot_id|>", "input": "caf\u00e9" * (i % 3),
                "output": f"The answer {i}\n\n### is <|end_of_text|> here"} for i in range(12)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    result = tokenize(data, tmp_path / "out", ranks_file, TokenizeSettings(max_seq_len=256, val_fraction=0.0),
                      workers=1)
    assert result.manifest["facts"]["written"] == len(records)
    oracle = meta_encoding(_ranks())
    bos, eos = oracle.encode_single_token("<|begin_of_text|>"), oracle.encode_single_token("<|end_of_text|>")
    rows = ds.dataset(tmp_path / "out" / "train", format="arrow").to_table().to_pylist()
    assert len(rows) == len(records)
    for row in rows:
        record = records[row["example_id"]]
        prompt = oracle.encode_ordinary(render_prompt(record["instruction"], record["input"]))
        response = oracle.encode_ordinary(record["output"])
        assert row["input_ids"] == [bos] + prompt + response + [eos]
        assert row["loss_mask"] == [False] * (1 + len(prompt)) + [True] * (len(response) + 1)


def test_tokenizer_json_config_is_part_of_the_cache_key(hf_json, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    path.write_bytes(hf_json.read_bytes())
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}] * 3))
    settings = TokenizeSettings(max_seq_len=128, val_fraction=0.0)
    first = tokenize(data, tmp_path / "out", path, settings, workers=1)
    rows = ds.dataset(tmp_path / "out" / "train", format="arrow").to_table().to_pylist()
    assert rows[0]["input_ids"][-1] == 1
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    second = tokenize(data, tmp_path / "out", path, settings, workers=1)
    assert not second.skipped and first.manifest != second.manifest
    rows = ds.dataset(tmp_path / "out" / "train", format="arrow").to_table().to_pylist()
    assert rows[0]["input_ids"][-1] == 2


def test_meta_llama3_download_with_its_tiktoken_file_converts(ranks_file, tmp_path):
    from stages.convert import ConvertSettings, convert
    from tests.oracles.checkpoints import (hf_to_meta_state_dict, meta_params, random_hf_llama_from_meta,
                                           write_meta_checkpoint)

    params = meta_params(64, 2, 8, 4, 32, rope_theta=500000.0)
    vocab = len(_ranks()) + 256
    hf = random_hf_llama_from_meta(params, vocab, seed=0)
    state = hf_to_meta_state_dict(hf.state_dict(), params["n_heads"], params["n_kv_heads"], rope_theta=500000.0)
    src = write_meta_checkpoint(tmp_path / "meta", state, params, 1, ranks_file, llama3=True)
    convert(src, tmp_path / "store", ConvertSettings(dtype="fp32"), progress=False)
    tok = load_tokenizer(tmp_path / "store")  # the store names the copied tiktoken file
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == vocab
    # one embedding row short: the same file does not belong to that model
    smaller = write_meta_checkpoint(tmp_path / "meta2", {**state, "tok_embeddings.weight":
                                   state["tok_embeddings.weight"][:-1], "output.weight": state["output.weight"][:-1]},
                                   {**params}, 1, ranks_file, llama3=True)
    with pytest.raises(JoraError, match="does not belong to this model"):
        convert(smaller, tmp_path / "store2", ConvertSettings(dtype="fp32"), progress=False)
