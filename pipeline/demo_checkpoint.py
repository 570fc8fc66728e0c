"""A tiny random Llama written in Meta's original layout for the demo (it holds the model in memory): the files
Meta ships (params.json, tokenizer.model, consolidated.NN.pth split as model-parallel shards)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jora_model.model.config import LlamaConfig
from jora_model.errors import JoraError

# [out, in] split dims of Meta's fairscale layers (see meta_checkpoint.py)
_SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _meta_tensors(config: LlamaConfig, rng: np.random.Generator):
    """Meta's [out, in] weights with std 1/sqrt(in) (unit-scale activations, so the frozen output head
    can express a peaked distribution for the adapter to learn), unit embeddings, unit norms."""
    d, e, f = config.dim, config.head_dim, config.ffn_dim

    def linear(out: int, fan_in: int) -> np.ndarray:
        return rng.normal(0, fan_in ** -0.5, (out, fan_in))

    yield "tok_embeddings.weight", rng.normal(0, 1.0, (config.vocab_size, d))
    for i in range(config.n_layers):
        p = f"layers.{i}."
        yield p + "attention.wq.weight", linear(config.n_heads * e, d)
        yield p + "attention.wk.weight", linear(config.n_kv_heads * e, d)
        yield p + "attention.wv.weight", linear(config.n_kv_heads * e, d)
        yield p + "attention.wo.weight", linear(d, config.n_heads * e)
        yield p + "feed_forward.w1.weight", linear(f, d)
        yield p + "feed_forward.w2.weight", linear(d, f)
        yield p + "feed_forward.w3.weight", linear(f, d)
        yield p + "attention_norm.weight", np.ones(d)
        yield p + "ffn_norm.weight", np.ones(d)
    yield "norm.weight", np.ones(d)
    yield "output.weight", linear(config.vocab_size, d)


def write_random_meta_checkpoint(out_dir: Path, params: dict[str, Any], config: LlamaConfig,
                                 tokenizer: Path | None, shards: int = 1, seed: int = 0,
                                 vocab_parallel: bool = False) -> Path:
    """Write params.json (as given), tokenizer.model and `shards` consolidated.NN.pth files in bf16.
    vocab_parallel: split the embedding on its vocabulary rows, as Llama 3's VocabParallelEmbedding does
    (Llama 2's ParallelEmbedding splits the model dim)."""
    import torch

    split = {**_SPLIT, "tok_embeddings": 0} if vocab_parallel else _SPLIT
    if vocab_parallel and config.vocab_size % shards:
        raise JoraError(f"{shards} shards cannot split a vocabulary of {config.vocab_size}")

    if config.n_kv_heads % shards or config.n_heads % shards:
        raise JoraError(f"{shards} shards cannot split {config.n_heads} heads / {config.n_kv_heads} KV heads")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=1) + "\n")
    if tokenizer is not None and Path(tokenizer).resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
    rng = np.random.default_rng(seed)
    states: list[dict[str, Any]] = [{} for _ in range(shards)]
    for name, value in _meta_tensors(config, rng):
        tensor = torch.from_numpy(np.asarray(value, np.float32)).to(torch.bfloat16)
        kind = name.split(".")[-2]
        for rank, piece in enumerate(tensor.chunk(shards, dim=split[kind]) if kind in split
                                     else [tensor] * shards):
            states[rank][name] = piece.clone()
    head_dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    for rank, state in enumerate(states):
        state["rope.freqs"] = freqs.to(torch.bfloat16)
        torch.save(state, out_dir / f"consolidated.{rank:02d}.pth")
    return out_dir
