"""The demo's source checkpoint: a tiny random Llama in Meta's layout, with a tokenizer trained on the
sample data, so the whole pipeline runs on a fresh machine without downloading weights.

Families: "llama2" (a SentencePiece tokenizer, params.json's vocab_size -1, the embedding split on its
width) and "llama3" (a tiktoken ranks file plus Meta's 256 special tokens, vocab_size written out, the
embedding split on its rows; the settings file asks for scaled rotary and fewer KV heads).

Inputs: the sample Alpaca file and the tiny model's settings (data/). Output: a directory in Meta's
layout (params.json, tokenizer.model, consolidated.NN.pth) that `convert` reads like a real one.
"""

from __future__ import annotations

import json
from pathlib import Path

from jora_model.errors import JoraError

from stages.base import StageResult, run_stage

CODE_VERSION = "demo-source-3"


def _texts(sample: Path):
    """The sample's text, and the prompt template's as often as training sees it (once a record): a real
    tokenizer knows the template's words, and one trained on the records alone spells them out letter by
    letter, doubling every row."""
    from jora_model.data.alpaca import TEMPLATES

    try:
        records = json.loads(sample.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JoraError(f"not valid JSON ({exc})", sample) from None
    template = TEMPLATES["alpaca"][0].replace("{instruction}", "").replace("{input}", "")
    for record in records:
        yield template
        for key in ("instruction", "input", "output"):
            if record.get(key):
                yield record[key]


FAMILIES = ("llama2", "llama3")


def _tokenizer(family: str, sample: Path, settings: dict, out: Path, shards: int) -> Path:
    from jora_model.data.tokenizer_files import TIKTOKEN_SPECIALS, tokenizer_vocab_size
    from pipeline.demo_tokenizer import train_llama_tokenizer, train_tiktoken_ranks

    vocab_size = int(settings.pop("tokenizer_vocab_size"))
    if family == "llama2":
        tokenizer = train_llama_tokenizer(_texts(sample), out, vocab_size)
        got = tokenizer_vocab_size(tokenizer)
        if got % shards:  # a text too short for vocab_size pieces gave any number; the output splits its rows
            tokenizer = train_llama_tokenizer(_texts(sample), out, got - got % shards)
        return tokenizer
    tokenizer = train_tiktoken_ranks(_texts(sample), out, vocab_size - TIKTOKEN_SPECIALS, multiple=shards)
    settings["vocab_size"] = tokenizer_vocab_size(tokenizer)  # Llama 3's params.json writes it out
    return tokenizer


def make_demo_source(sample: Path, model_settings: Path, out: Path, family: str = "llama2") -> StageResult:
    if family not in FAMILIES:
        raise JoraError(f"unknown demo family {family!r}; choose {' or '.join(FAMILIES)}")

    def build(tmp: Path) -> dict:
        from jora_model.model.config import read_meta_params
        from pipeline.demo_checkpoint import write_random_meta_checkpoint
        from jora_model.data.tokenizer_files import tokenizer_vocab_size

        settings = json.loads(model_settings.read_text())
        shards = int(settings.get("model_parallel_shards", 1))
        tokenizer = _tokenizer(family, sample, settings, tmp / "tokenizer.model", shards)
        settings.pop("model_parallel_shards", None)
        seed = int(settings.pop("seed", 0))
        settings.pop("_comment", None)
        (tmp / "params.json").write_text(json.dumps(settings))
        config = read_meta_params(tmp / "params.json", vocab_size=tokenizer_vocab_size(tokenizer))
        write_random_meta_checkpoint(tmp, settings, config, tokenizer, shards=shards, seed=seed,
                                     vocab_parallel=family == "llama3")
        return {"config": config.to_dict(), "shards": shards}

    # the Llama 2 demo keeps the settings (and so the cache key) it always had
    key = {} if family == "llama2" else {"family": family}
    return run_stage("demo-source", CODE_VERSION, out, {"sample": sample, "model": model_settings}, key, build)
