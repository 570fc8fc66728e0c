"""Python entry points that hide Haiku: load a store, get logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jora_model.model.config import LlamaConfig
from jora_model.formats.store import ShardingFor, Store, load_params


class LoadedModel:
    """A base model loaded from a parameter store, ready for forward passes."""

    def __init__(self, config: LlamaConfig, params: Any, compute_dtype: str, store_path: Path | None = None,
                 lora: Any = None):
        import jax

        from jora_model.model.llama import ModelOptions, transformed

        self.config = config
        self.params = params
        self.store_path = store_path
        self.options = ModelOptions(compute_dtype=compute_dtype, lora=lora)
        self._apply = jax.jit(transformed(config, self.options).apply)

    def logits(self, tokens: Any, segment_ids: Any = None) -> np.ndarray:
        """tokens int [B, T] -> float32 numpy [B, T, V]."""
        import jax.numpy as jnp

        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        return np.asarray(self._apply(self.params, None, jnp.asarray(tokens, jnp.int32), seg))


def load_model(path: str | Path, dtype: str = "float32", sharding_for: ShardingFor | None = None,
               adapter: str | Path | None = None) -> LoadedModel:
    """Load a parameter store, with a trained LoRA adapter (a train output or its adapter/ directory)
    when given. `dtype` is the compute dtype; parameters keep their stored dtype."""
    store = Store(path)
    try:
        params = load_params(store, sharding_for)
    finally:
        store.close()
    lora = None
    if adapter is not None:
        import jax

        from jora_model.formats.adapter import load_adapter
        from jora_model.model.lora import merge_params

        lora_params, lora, _ = load_adapter(Path(adapter), store.config)
        params = merge_params(params, jax.tree.map(np.asarray, lora_params))
    return LoadedModel(store.config, params, dtype, Path(path), lora)
