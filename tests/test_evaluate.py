"""jora evaluate: its figures recomputed from its own predictions by an independent SQuAD implementation,
its greedy answers and response losses against transformers on the HF export of the same model, the
no-context ablation, caching, golden shards (packed), and bad input."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from click.testing import CliRunner

from jora_model.data.templates import load_template
from jora_model.data.tokenizer import load_tokenizer
from jora_model.errors import JoraError
from jora_model.evaluation.report import metric
from jora_model.formats.adapter import save_adapter
from jora_model.formats.store import Store
from jora_model.model.lora import LoraSettings, init_lora_params
from pipeline.cli import cli
from stages.evaluate import EvaluateSettings, evaluate
from stages.export import export
from stages.tokenize import TokenizeSettings, tokenize
from tests.oracles.checkpoints import train_tokenizer
from tests.test_convert_stage import assert_clean_failure
from tests.train_helpers import WORDS, tiny_store

NEW_TOKENS = 10
SETTINGS = EvaluateSettings(batch_size=4, max_new_tokens=NEW_TOKENS)


def _records(n: int = 9, seed: int = 3) -> list[dict]:
    """Prompts of many lengths (so every batch mixes them), some with context and some without."""
    rng = random.Random(seed)
    return [{"instruction": " ".join(rng.choices(WORDS, k=2 + i % 4)),
             "input": " ".join(rng.choices(WORDS, k=3 * i)) if i % 3 else "",
             "output": " ".join(rng.choices(WORDS, k=1 + i % 3))} for i in range(n)]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_model):
    """A tiny store, an adapter with a real update on every target, its merged HF export, and one
    evaluation of a golden JSON file."""
    root = tmp_path_factory.mktemp("evaluate")
    _, store = tiny_store(root, tokenizer_model)
    config = Store(store).config
    lora = LoraSettings(r=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    params = init_lora_params(config, lora, 0)
    rng = np.random.default_rng(1)
    for leaves in params.values():
        leaves["lora_b"] = rng.normal(0, 0.05, leaves["lora_b"].shape).astype(np.float32)
    adapter = save_adapter(root / "run" / "adapter", params, lora, config, "base").parent
    golden = root / "golden.json"
    golden.write_text(json.dumps(_records()))
    out = evaluate(store, golden, root / "eval", adapter, SETTINGS).out_dir
    hf = export(store, root / "hf", adapter=adapter, dtype="fp32", verify=False).out_dir
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    return root, store, adapter, golden, out, model


# --- SQuAD v1.1 written here from its published definition, not imported from jora ---------------------

def _squad_normal(text: str) -> str:
    lowered = text.lower()
    no_punct = lowered.translate(str.maketrans("", "", string.punctuation))
    no_articles = re.sub(r"\b(a|an|the)\b", " ", no_punct)
    return " ".join(no_articles.split())


def _squad_em(prediction: str, truth: str) -> float:
    return 1.0 if _squad_normal(prediction) == _squad_normal(truth) else 0.0


def _squad_f1(prediction: str, truth: str) -> float:
    predicted, wanted = _squad_normal(prediction).split(), _squad_normal(truth).split()
    remaining, same = list(wanted), 0
    for token in predicted:
        if token in remaining:
            remaining.remove(token)
            same += 1
    if same == 0:
        return 0.0
    p, r = same / len(predicted), same / len(wanted)
    return 2 * p * r / (p + r)


def test_squad_oracle_on_known_pairs():
    """The oracle itself, on values worked out by hand from the definition."""
    assert _squad_normal("The  Cat, sat!") == "cat sat"
    assert _squad_em("an Apple.", "apple") == 1.0
    assert _squad_f1("red red blue", "red green") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert _squad_f1("", "") == 0.0  # v1.1: nothing shared, even for two empty answers


def _rewritten_references(lines: list[dict]) -> list[str]:
    """References the model's (fixed, greedy) answers match to every degree: exactly, up to SQuAD's
    normalisation, in part, not at all."""
    out = []
    for i, line in enumerate(lines):
        words = line["prediction"].split() or ["nothing"]
        out.append([line["prediction"], "The " + line["prediction"].upper() + "!",
                    " ".join(words[: max(1, len(words) // 2)] + ["robot"]), "zzz"][i % 4])
    return out


def test_metrics_recompute_from_predictions(world, tmp_path):
    root, store, adapter, golden, out, _ = world
    # Same prompts, other references: the greedy answers stay, and match the references to every degree.
    records = _records()
    for record, reference in zip(records, _rewritten_references(_lines(out))):
        record["output"] = reference
    rewritten = tmp_path / "golden.json"
    rewritten.write_text(json.dumps(records))
    again = evaluate(store, rewritten, tmp_path / "eval", adapter, SETTINGS).out_dir
    lines, report = _lines(again), _report(again)
    assert [line["prediction_ids"] for line in lines] == [line["prediction_ids"] for line in _lines(out)]
    assert report["n"] == len(records) == len(lines) and [line["index"] for line in lines] == list(range(len(records)))
    for part in (lambda line: line, lambda line: line["no_context"]):
        em = [_squad_em(part(line)["prediction"], line["reference"]) for line in lines]
        f1 = [_squad_f1(part(line)["prediction"], line["reference"]) for line in lines]
        assert [part(line)["exact_match"] for line in lines] == em
        assert [part(line)["token_f1"] for line in lines] == pytest.approx(f1, abs=1e-12)
        figures = part(report) if part(report) is not report else report
        assert figures["exact_match"] == pytest.approx(sum(em) / len(em), abs=1e-12)
        assert figures["token_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-12)
        nll = sum(part(line)["loss"] * part(line)["response_tokens"] for line in lines)
        tokens = sum(part(line)["response_tokens"] for line in lines)
        assert figures["loss"] == pytest.approx(nll / tokens, rel=1e-9)
        assert figures["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
    assert 0 < report["exact_match"] < 1 and 0 < report["token_f1"] < 1
    assert len({round(line["token_f1"], 6) for line in lines}) >= 3  # more than all-or-nothing
    assert report["data"] == str(rewritten.resolve())
    assert report["data_sha256"] == __import__("hashlib").sha256(rewritten.read_bytes()).hexdigest()



def _hf_greedy(model, prompt: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """transformers' greedy answer to one prompt alone (no padding anywhere), cut at its first stop id."""
    out = model.generate(torch.as_tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=list(stop_ids), pad_token_id=0)[0, len(prompt):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in stop_ids), out)


def test_predictions_equal_transformers_greedy(world, tokenizer_model):
    """Every answer, with and without the context, equals transformers' greedy generate on the merged
    HF export given the same prompt ids alone. The golden prompts have 9 lengths, answered 4 at a time
    after sorting, so each batch left-pads rows by different amounts (checked below). A padding bug
    fails this: a start slot off by one either shows a padding key to the row's queries or hides its bos,
    and a logit read from the wrong slot or a cache written one slot off changes the next token; with
    weights at std 1/sqrt(fan_in) any of these changes the logits by far more than the argmax margins
    over 9 prompts x 10 tokens. A rotary position offset shared by a row would go unseen, and is harmless:
    rotary attention depends only on the distance between positions."""
    root, store, adapter, golden, out, model = world
    tokenizer = load_tokenizer(store)
    template = load_template("alpaca", tokenizer)
    records, lines = _records(), _lines(out)
    prompts = [template.prompt_ids(r["instruction"], r["input"]).tolist() for r in records]
    lengths = sorted(len(p) for p in prompts)
    assert all(len(set(lengths[i:i + 4])) > 1 for i in range(0, len(lengths) - 1, 4)), lengths
    for record, prompt, line in zip(records, prompts, lines):
        assert line["prediction_ids"] == _hf_greedy(model, prompt, template.stop_ids)
        assert line["prediction"] == tokenizer.decode(line["prediction_ids"])
        bare = template.prompt_ids(record["instruction"], "").tolist()
        assert line["no_context"]["prediction_ids"] == _hf_greedy(model, bare, template.stop_ids)
    assert len({tuple(line["prediction_ids"]) for line in lines}) > 1


def test_loss_equals_transformers_cross_entropy(world, tokenizer_model):
    """Each record's loss is transformers' mean cross-entropy over the response tokens and eos, given the
    prompt. Both run in float32 on the same weights; their logits differ by rounding only (about 1e-6 of
    their size), so a mean NLL near 6.5 agrees to 1e-4; a wrong mask (one token more or less, the prompt's
    last token included) moves it by far more."""
    root, store, adapter, golden, out, model = world
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    template = load_template("alpaca", load_tokenizer(store))
    for part, context in (("main", None), ("no_context", "")):
        for record, line in zip(_records(), _lines(out)):
            prompt = template.prompt_ids(record["instruction"], record["input"] if context is None else "").tolist()
            reply = sp.encode(record["output"]) + [sp.eos_id()]
            ids = torch.as_tensor([prompt + reply])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1:-1]
            theirs = torch.nn.functional.cross_entropy(logits, torch.as_tensor(reply)).item()
            figures = line if part == "main" else line["no_context"]
            assert figures["response_tokens"] == len(reply)
            assert figures["loss"] == pytest.approx(theirs, abs=1e-4), (part, line["index"])


def test_no_context_empties_the_input(world):
    from jora_model.evaluation.golden import from_records

    root, store, adapter, golden, out, model = world
    tokenizer = load_tokenizer(store)
    template = load_template("alpaca", tokenizer)
    examples = from_records(golden, tokenizer, template, 4096).examples
    for record, example in zip(_records(), examples):
        assert example.no_context.prompt.tolist() == template.prompt_ids(record["instruction"], "").tolist()
        assert (example.no_context.prompt.tolist() == example.request.prompt.tolist()) == (not record["input"])
        assert example.no_context.reply.tolist() == example.request.reply.tolist()
    report = _report(out)
    assert report["no_context"]["n"] == report["n"] and report["no_context"]["loss"] != report["loss"]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_rerun_skips_and_a_changed_golden_file_reruns(world, tmp_path):
    root, store, adapter, golden, out, _ = world
    before = (out / "predictions.jsonl").stat().st_mtime_ns
    result = _invoke("evaluate", "--model", store, "--adapter", adapter, "--data", golden, out, "--batch-size", 4,
                     "--max-new-tokens", NEW_TOKENS)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("skipped (up to date)") and "9 records: exact match" in result.stdout
    assert (out / "predictions.jsonl").stat().st_mtime_ns == before
    changed = tmp_path / "golden.json"
    shutil.copy(golden, changed)
    first = evaluate(store, changed, tmp_path / "eval", adapter, SETTINGS)
    assert not first.skipped and evaluate(store, changed, tmp_path / "eval", adapter, SETTINGS).skipped
    first_hash = _report(first.out_dir)["data_sha256"]
    records = _records()
    records[0]["output"] = "an answer of another kind"
    changed.write_text(json.dumps(records))
    again = evaluate(store, changed, tmp_path / "eval", adapter, SETTINGS)
    assert not again.skipped and _lines(again.out_dir)[0]["reference"] == "an answer of another kind"
    assert _report(again.out_dir)["data_sha256"] != first_hash


def test_cut_records_are_cut_as_tokenize_cuts_them(world, tmp_path):
    """A context too long for max_seq_len is cut exactly as tokenize cuts it: the same records are cut,
    and the prompts are the shards' prompts (so the answers equal those of the shards as golden set)."""
    root, store, adapter, golden, out, _ = world
    settings = EvaluateSettings(batch_size=4, max_new_tokens=4, max_seq_len=200)
    cut = evaluate(store, golden, tmp_path / "cut", adapter, settings).out_dir
    shards = tokenize(golden, tmp_path / "shards", store, TokenizeSettings(max_seq_len=200, val_fraction=0.5),
                      workers=1)
    stats = shards.manifest["facts"]
    report = _report(cut)
    assert report["truncated"] == stats["cut"]["examples"] > 0
    assert report["truncated"] == sum(line["truncated"] for line in _lines(cut))
    assert report["n"] + sum(report["dropped"].values()) == len(_records())
    from_shards = evaluate(store, shards.out_dir, tmp_path / "from-shards", adapter, settings).out_dir
    by_index = {line["index"]: line for line in _lines(cut)}
    shard_lines = _lines(from_shards)
    assert shard_lines and any(by_index[line["index"]]["truncated"] for line in shard_lines)
    for line in shard_lines:
        assert line["prediction_ids"] == by_index[line["index"]]["prediction_ids"]
        assert line["loss"] == pytest.approx(by_index[line["index"]]["loss"], abs=1e-5)


def test_packed_golden_shards(world, tmp_path):
    """The tokenize stage's held-out split as golden set, packed several examples to a row: each example
    is found again (prompt, reference, answer and loss as from the JSON file); no context cannot be made."""
    from jora_model.data.shards import ShardSet

    root, store, adapter, golden, out, _ = world
    shards = tokenize(golden, tmp_path / "shards", store,
                      TokenizeSettings(max_seq_len=1024, val_fraction=0.6, pack=True), workers=1).out_dir
    rows = ShardSet(shards / "val")
    assert any(len(rows.row(i).example_ids) > 1 for i in range(len(rows)))
    result = _invoke("evaluate", "--model", store, "--adapter", adapter, "--data", shards, tmp_path / "eval",
                     "--batch-size", 4, "--max-new-tokens", NEW_TOKENS)
    assert result.exit_code == 0, result.output
    report, lines = _report(tmp_path / "eval"), _lines(tmp_path / "eval")
    assert report["no_context"] is None and "cannot be told apart" in report["no_context_reason"]
    assert report["data"] == str((shards / "val").resolve()) and report["truncated"] is None
    ours = {line["index"]: line for line in _lines(out)}
    val_ids = sorted(i for r in range(len(rows)) for i in rows.row(r).example_ids)
    assert [line["index"] for line in lines] == val_ids and report["n"] == len(val_ids) >= 4
    for line in lines:
        assert line["reference"] == _records()[line["index"]]["output"]
        assert line["prediction_ids"] == ours[line["index"]]["prediction_ids"]
        assert line["loss"] == pytest.approx(ours[line["index"]]["loss"], abs=1e-5)
        assert line["no_context"] is None


def test_bad_golden_sets_fail_in_one_line(world, tmp_path):
    from tests.test_convert_stage import no_leftovers

    root, store, adapter, golden, out, _ = world
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    malformed = tmp_path / "malformed.json"
    malformed.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]')
    no_output = tmp_path / "no-output.jsonl"
    no_output.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n')
    foreign = train_tokenizer(tmp_path / "foreign" / "tokenizer.model", vocab_size=310)
    foreign_shards = tokenize(golden, tmp_path / "foreign-shards", foreign, TokenizeSettings(val_fraction=0.5),
                              workers=1).out_dir
    own_shards = tokenize(golden, tmp_path / "own-shards", store, TokenizeSettings(val_fraction=0.5),
                          workers=1).out_dir
    cases = [(empty, [], "empty data file", empty), (malformed, [], "invalid JSON at line 2", malformed),
             (no_output, [], "record 1: missing 'output'", no_output),
             (foreign_shards, [], "another tokenizer", foreign_shards / "val"),
             (own_shards, ["--template", "llama2-chat"], "cannot change them", own_shards / "val")]
    for i, (data, extra, says, names) in enumerate(cases):
        result = _invoke("evaluate", "--model", store, "--adapter", adapter, "--data", data, tmp_path / f"out-{i}",
                         *extra)
        assert_clean_failure(result, says, str(names))
        assert not (tmp_path / f"out-{i}").exists() and no_leftovers(tmp_path, f"out-{i}")
    with pytest.raises(JoraError, match="unknown evaluation metric 'bleu'; known: exact_match, token_f1"):
        metric(_report(out), "bleu")
    assert metric(_report(out), "token_f1") == _report(out)["token_f1"]


def test_each_row_stops_at_its_first_stop_id(world):
    """Rows of one batch stop at different steps: each answer is the unstopped answer cut before the
    first of the stop ids, whatever the other rows do (they go on until theirs)."""
    from jora_model import load_model
    from jora_model.evaluation.greedy import BatchedGreedy

    root, store, adapter, golden, out, _ = world
    tokenizer = load_tokenizer(store)
    template = load_template("alpaca", tokenizer)
    prompts = [template.prompt_ids(r["instruction"], r["input"]) for r in _records()]
    greedy = BatchedGreedy(load_model(store, adapter=adapter), batch_size=4)
    free = greedy.generate(prompts, NEW_TOKENS, [])
    stops = [free[0][3], free[1][5]]
    stopped = greedy.generate(prompts, NEW_TOKENS, stops)
    for answer, cut in zip(free, stopped):
        first = next((i for i, token in enumerate(answer) if token in stops), len(answer))
        assert cut == answer[:first]
    assert len({len(answer) for answer in stopped}) > 1


def test_template_of_the_training_shards(world, tmp_path):
    """With --tokenized, a JSON golden set is prompted with the template and system prompt the training
    shards recorded, and answers as transformers does to that prompt."""
    root, store, adapter, golden, out, model = world
    shards = tokenize(golden, tmp_path / "shards", store,
                      TokenizeSettings(template="llama2-chat", system="Answer briefly."), workers=1).out_dir
    result = evaluate(store, golden, tmp_path / "eval", adapter, SETTINGS, tokenized=shards).out_dir
    assert _report(result)["template"] == {"name": "llama2-chat", "system": "Answer briefly."}
    template = load_template("llama2-chat", load_tokenizer(store), "Answer briefly.")
    record, line = _records()[1], _lines(result)[1]
    prompt = template.prompt_ids(record["instruction"], record["input"]).tolist()
    assert line["prediction_ids"] == _hf_greedy(model, prompt, template.stop_ids)
    assert line["prediction_ids"] != _lines(out)[1]["prediction_ids"]
