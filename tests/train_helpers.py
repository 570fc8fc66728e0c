"""Tiny stores and tokenized data for the training tests (made here, never downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from stages.convert import ConvertSettings, convert
from stages.train import train
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


def tiny_run(store: Path, shards: Path, out: Path) -> Path:
    """Two steps of LoRA (r 4) on `store` with `shards`: a train output whose adapter is not the identity."""
    from jora_model.model.lora import LoraSettings
    from jora_model.training.settings import TrainSettings

    settings = TrainSettings(lora=LoraSettings(r=4, alpha=8.0), batch_size=2, grad_accum=1, max_seq_len=256,
                             max_steps=2, eval_every=0, lr=1e-2)
    return train(store, shards, out, settings, progress=False).out_dir
