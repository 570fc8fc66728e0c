"""The tokenize stage: masks, cutting, splits, packing, determinism, and bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from jora_model.data.alpaca import AlpacaConfig, TEMPLATES, generate_alpaca_dataset, render_prompt
from jora_model.data.tokenizer import Tokenizer
from pipeline.cli import cli
from stages.tokenize import TokenizeSettings, tokenize
from tests.test_convert_stage import assert_clean_failure, file_identities, no_leftovers

MAX = 512
JORA = Path(sys.executable).with_name("jora")
WORDS = ("battery firmware robot aisle charger passage the of and to a in is error code "
         "check replace update safety lifter porter").split()


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    extras = ["é", "€", "搬送", "🔋", "\t", "  ", "</s>", "<s>", "### Response:", "\n", "E204"]
    for _ in range(max(1, n_words // 8)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(extras))
    return " ".join(words)


def make_records(n: int = 120, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = i % 6
        record = {"instruction": _text(rng, rng.randint(3, 12)),
                  "input": "" if kind == 0 else _text(rng, rng.randint(5, 40)),
                  "output": _text(rng, rng.randint(1, 20))}
        if kind == 1:
            record["input"] = _text(rng, 400)  # far longer than MAX: context must be cut
        if kind == 2:
            record["output"] = _text(rng, 25)  # long answer, still fits
        if kind == 3 and i % 12 == 3:
            record["output"] = _text(rng, 600)  # cannot fit: must be dropped, never cut
        if kind == 4 and i % 12 == 4:
            record["instruction"] = _text(rng, 300)  # long instruction: cut after the context is gone
        records.append(record)
    records.append({"instruction": "Say nothing.", "output": ""})  # no input key, empty output
    return records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("tokenize")
    records = make_records()
    data = root / "data.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = tokenize(data, root / "out", tokenizer_model, TokenizeSettings(max_seq_len=MAX, val_fraction=0.1),
                      workers=2)
    return records, root, result


def _rows(out: Path, split: str) -> list[dict]:
    return ds.dataset(out / split, format="arrow").to_table().to_pylist()


def test_masks_cover_exactly_the_response_and_eos(dataset, tokenizer_model):
    records, root, result = dataset
    tok = Tokenizer(tokenizer_model)
    rows = _rows(root / "out", "train") + _rows(root / "out", "val")
    report = result.manifest["facts"]
    assert len(rows) == report["written"] > 80
    seen_cut_input = seen_cut_instruction = 0
    for row in rows:
        ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"], bool)
        record = records[row["example_id"]]
        assert row["length"] == len(ids) == len(mask) <= MAX
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert mask.any() and mask[-1] and not mask[0]
        first = int(np.argmax(mask))
        assert mask[first:].all()  # one contiguous run to the end: the response and eos
        # special ids appear only where we put them: literal "</s>" in text stayed text
        assert (ids == tok.eos_id).sum() == 1 and (ids == tok.bos_id).sum() == 1
        assert tok.decode(ids[first:-1].tolist()) == record["output"]  # response kept whole, cut or not
        prompt = tok.decode(ids[1:first].tolist())
        full = render_prompt(record["instruction"], record.get("input", ""))
        if prompt == full:
            continue
        context = record.get("input", "")
        with_input, without_input = TEMPLATES["alpaca"]
        if prompt.startswith(with_input.split("{instruction}")[0]) and "### Input:" in prompt:
            kept_context = prompt.split("### Input:\n", 1)[1].rsplit("\n\n### Response:\n", 1)[0]
            assert context.startswith(kept_context) and len(kept_context) < len(context)
            assert record["instruction"] in prompt  # context goes before the instruction is touched
            seen_cut_input += 1
        else:  # the context is gone entirely; then the instruction may have lost its end
            assert prompt.startswith(without_input.split("{instruction}")[0])
            kept = prompt.split("### Instruction:\n", 1)[1].rsplit("\n\n### Response:\n", 1)[0]
            assert record["instruction"].startswith(kept)
            assert context or len(kept) < len(record["instruction"])
            seen_cut_input += bool(context)
            seen_cut_instruction += len(kept) < len(record["instruction"])
    assert seen_cut_input >= 10 and seen_cut_instruction >= 3
    assert report["cut"]["input"] == seen_cut_input and report["cut"]["instruction"] == seen_cut_instruction
    template = len(tok.encode(render_prompt("", "")))
    too_long = sum(len(tok.encode(r["output"])) + 2 > MAX for r in records)
    no_room = sum(len(tok.encode(r["output"])) + 2 + template > MAX for r in records) - too_long
    assert too_long == 10 and no_room == 0
    assert report["dropped"] == {"response longer than max_seq_len": too_long}


def test_uncut_examples_round_trip_and_match_the_library_entry_point(dataset, tokenizer_model):
    records, root, _ = dataset
    config = AlpacaConfig(tokenizer=str(tokenizer_model), max_seq_len=MAX, val_fraction=0.1)
    for split, name in (("train", "train"), ("test", "val")):
        api = generate_alpaca_dataset(root / "data.json", split, config)
        rows = sorted(_rows(root / "out", name), key=lambda r: r["example_id"])
        assert [e["example_id"] for e in api] == [r["example_id"] for r in rows]
        for e, r in zip(api, rows):
            assert e["input_ids"].tolist() == r["input_ids"]
            assert e["loss_mask"].astype(int).tolist() == r["loss_mask"]


def test_splits_are_disjoint_and_seeded(dataset):
    _, root, result = dataset
    train = {r["example_id"] for r in _rows(root / "out", "train")}
    val = {r["example_id"] for r in _rows(root / "out", "val")}
    assert train and val and not train & val
    stats = json.loads((root / "out" / "stats.json").read_text())
    assert stats["splits"]["val"]["examples"] == len(val)


def test_same_seed_same_bytes_whatever_the_worker_count(dataset, tokenizer_model, tmp_path):
    _, root, _ = dataset
    again = tokenize(root / "data.json", tmp_path / "again", tokenizer_model,
                     TokenizeSettings(max_seq_len=MAX, val_fraction=0.1), workers=1)
    for split in ("train", "val"):
        ours = sorted((root / "out" / split).glob("*.arrow"))
        theirs = sorted((again.out_dir / split).glob("*.arrow"))
        assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs]
    other = tokenize(root / "data.json", tmp_path / "other-seed", tokenizer_model,
                     TokenizeSettings(max_seq_len=MAX, val_fraction=0.1, seed=1), workers=1)
    assert {r["example_id"] for r in _rows(other.out_dir, "val")} != \
        {r["example_id"] for r in _rows(root / "out", "val")}


def test_packing_keeps_every_example_once_within_the_limit(dataset, tokenizer_model, tmp_path):
    _, root, _ = dataset
    packed = tokenize(root / "data.json", tmp_path / "packed", tokenizer_model,
                      TokenizeSettings(max_seq_len=MAX, val_fraction=0.1, pack=True), workers=1)
    unpacked = {r["example_id"]: r for split in ("train", "val") for r in _rows(root / "out", split)}
    rows = _rows(packed.out_dir, "train") + _rows(packed.out_dir, "val")
    assert len(rows) < len(unpacked)  # short examples share rows
    seen = []
    for row in rows:
        assert row["length"] <= MAX and len(row["segment_ids"]) == row["length"]
        seg = np.array(row["segment_ids"])
        for k, example_id in enumerate(row["example_ids"], start=1):
            part = np.flatnonzero(seg == k)
            assert part.size and np.all(np.diff(part) == 1)  # each segment contiguous
            assert np.array(row["input_ids"])[part].tolist() == unpacked[example_id]["input_ids"]
            assert np.array(row["loss_mask"])[part].tolist() == unpacked[example_id]["loss_mask"]
            seen.append(example_id)
    assert sorted(seen) == sorted(unpacked)


def test_cli_report_and_fast_skip(tmp_path, tokenizer_model):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_records(30, seed=2)) + "\n")
    args = [JORA, "tokenize", data, tmp_path / "out", "--tokenizer", tokenizer_model, "--max-seq-len", str(MAX)]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "examples in: 31" in first.stdout and "dropped: 3 response longer than max_seq_len" in first.stdout
    before = file_identities(tmp_path / "out")
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0 and "skipped" in second.stdout
    assert file_identities(tmp_path / "out") == before  # nothing re-tokenized or rewritten


def test_tokenizer_from_a_parameter_store(tmp_path, tokenizer_model):
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.json").write_text(json.dumps({"tokenizer": "tokenizer.model"}))
    (store / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    data = tmp_path / "d.json"
    data.write_text(json.dumps(make_records(12)))
    result = tokenize(data, tmp_path / "out", store, TokenizeSettings(max_seq_len=MAX), workers=1)
    assert result.manifest["facts"]["written"] > 0


BAD = {
    "invalid-json": (b'[{"instruction": "a", "output": "b"},\n {"instruction": }]', "line 2, column"),
    "missing-output": (json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]).encode(),
                       "record 1: missing 'output'"),
    "missing-instruction": (json.dumps([{"output": "b"}]).encode(), "record 0: missing 'instruction'"),
    "not-a-string": (json.dumps([{"instruction": "a", "input": 3, "output": "b"}]).encode(),
                     "record 0: 'input' is a int"),
    "empty-file": (b"  \n", "empty data file"),
    "empty-list": (b"[]", "no records"),
    "not-utf8": (b'[{"instruction": "caf\xe9", "output": "b"}]', "not UTF-8"),
    "bad-jsonl": (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n',
                  "line 2, column"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_line_naming_file_and_record(case, tmp_path, tokenizer_model):
    content, message = BAD[case]
    data = tmp_path / "data.json"
    data.write_bytes(content)
    result = CliRunner().invoke(cli, ["tokenize", str(data), str(tmp_path / "out"), "--tokenizer",
                                      str(tokenizer_model)], catch_exceptions=False)
    assert_clean_failure(result, str(data), message)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_lenient_skips_and_counts_bad_records(tmp_path, tokenizer_model):
    records = make_records(20) + [{"instruction": "x"}, {"instruction": 5, "output": "y"}, "text"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    result = tokenize(data, tmp_path / "out", tokenizer_model,
                      TokenizeSettings(max_seq_len=MAX, strict=False), workers=1)
    dropped = result.manifest["facts"]["dropped"]
    assert dropped["invalid record: missing 'output'"] == 1
    assert dropped["invalid record: 'instruction' is a int, not a string"] == 1
    assert dropped["invalid record: is a str, not an object"] == 1


def test_tokenizer_that_is_not_sentencepiece(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    data = tmp_path / "d.json"
    data.write_text(json.dumps(make_records(3)))
    result = CliRunner().invoke(cli, ["tokenize", str(data), str(tmp_path / "out"), "--tokenizer", str(bad)],
                                catch_exceptions=False)
    assert_clean_failure(result, str(bad), "not a SentencePiece model")
    assert not (tmp_path / "out").exists()


def test_everything_dropped_is_an_error(tmp_path, tokenizer_model):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "word " * 400}]))
    result = CliRunner().invoke(cli, ["tokenize", str(data), str(tmp_path / "out"), "--tokenizer",
                                      str(tokenizer_model), "--max-seq-len", "64"], catch_exceptions=False)
    assert_clean_failure(result, "every record was dropped")


def test_pack_fills_rows_nearly_optimally():
    from jora_model.data.packing import pack

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 120, size=2000)
    examples = [(i, np.full(n, i, np.int32), np.ones(n, bool)) for i, n in enumerate(lengths)]
    rows = list(pack(examples, 256))
    lower_bound = -(-lengths.sum() // 256)
    assert all(len(r.input_ids) <= 256 for r in rows)
    assert len(rows) <= 1.03 * lower_bound
    assert sorted(i for r in rows for i in r.example_ids) == list(range(2000))
