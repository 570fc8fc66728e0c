"""Tiny stores and tokenized data for the training tests (made here, never downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from stages.convert import ConvertSettings, convert
from stages.tokenize import TokenizeSettings, tokenize
from tests.oracles.checkpoints import random_hf_llama, write_hf_dir

WORDS = "battery robot aisle charger firmware safety check replace update error code lifter porter".split()


def tiny_store(root: Path, tokenizer: Path, n_heads: int = 4, n_kv_heads: int = 2, dtype: str = "fp32",
               seed: int = 0, dim: int = 64, ffn: int = 96, layers: int = 2):
    hf = random_hf_llama(320, dim, layers, n_heads, n_kv_heads, ffn, seed=seed)
    src = write_hf_dir(hf, root / f"hf-{seed}-{n_heads}-{n_kv_heads}", tokenizer)
    return hf, convert(src, root / f"store-{seed}-{n_heads}-{n_kv_heads}-{dtype}", ConvertSettings(dtype=dtype),
                       progress=False).out_dir


def tiny_data(root: Path, tokenizer: Path, n: int = 24, seed: int = 0, max_len: int = 256) -> Path:
    """Short records: every row fits one 256-token bucket, so one compiled step shape."""
    rng = random.Random(seed)
    records = [{"instruction": " ".join(rng.choices(WORDS, k=2)), "input": "",
                "output": " ".join(rng.choices(WORDS, k=3))} for _ in range(n)]
    data = root / f"data-{seed}.json"
    data.write_text(json.dumps(records))
    return tokenize(data, root / f"shards-{seed}", tokenizer,
                    TokenizeSettings(max_seq_len=max_len, val_fraction=0.2), workers=1).out_dir
