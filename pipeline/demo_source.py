"""The demo's source checkpoint: a tiny random Llama in Meta's layout, with a SentencePiece tokenizer
trained on the sample data, so the whole pipeline runs on a fresh machine without downloading weights.

Inputs: the sample Alpaca file and the tiny model's settings (data/). Output: a directory in Meta's
layout (params.json, tokenizer.model, consolidated.NN.pth) that `convert` reads like a real one.
"""

from __future__ import annotations

import json
from pathlib import Path

from jora_model.errors import JoraError

from stages.base import StageResult, run_stage

CODE_VERSION = "demo-source-2"


def _texts(sample: Path):
    try:
        records = json.loads(sample.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JoraError(f"not valid JSON ({exc})", sample) from None
    for record in records:
        for key in ("instruction", "input", "output"):
            if record.get(key):
                yield record[key]


def make_demo_source(sample: Path, model_settings: Path, out: Path) -> StageResult:
    def build(tmp: Path) -> dict:
        from jora_model.model.config import read_meta_params
        from pipeline.demo_checkpoint import write_random_meta_checkpoint
        from jora_model.data.tokenizer_files import tokenizer_vocab_size
        from pipeline.demo_tokenizer import train_llama_tokenizer

        settings = json.loads(model_settings.read_text())
        tokenizer = train_llama_tokenizer(_texts(sample), tmp / "tokenizer.model",
                                          int(settings.pop("tokenizer_vocab_size")))
        shards = int(settings.pop("model_parallel_shards", 1))
        seed = int(settings.pop("seed", 0))
        settings.pop("_comment", None)
        (tmp / "params.json").write_text(json.dumps(settings))
        config = read_meta_params(tmp / "params.json", vocab_size=tokenizer_vocab_size(tokenizer))
        write_random_meta_checkpoint(tmp, settings, config, tokenizer, shards=shards, seed=seed)
        return {"config": config.to_dict(), "shards": shards}

    return run_stage("demo-source", CODE_VERSION, out, {"sample": sample, "model": model_settings}, {}, build)
