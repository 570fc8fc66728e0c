"""Names and shapes of the base model's tensors: in the parameter store and in the Haiku tree.

The store keeps one tensor per layer (`layers.3.attention.q_proj`) so conversion can stream tensor by
tensor; the model keeps each per-layer weight stacked on a leading L axis so the decoder runs as one
scanned layer. Matrices are stored [in, out] (the layout `x @ w` wants). Rotary: q_proj/k_proj output
features use the rotate-half convention (transformers'), not Meta's interleaved pairs. See README,
"Rotary convention".
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jora_model.model.config import LlamaConfig

Shape = tuple[int, ...]

# per-layer store suffix -> (Haiku module path under the stacked "layers" module, parameter, shape)
_PER_LAYER: dict[str, tuple[str, str, Callable[[LlamaConfig], Shape]]] = {
    "attention_norm": ("layers/attention_norm", "scale", lambda c: (c.dim,)),
    "attention.q_proj": ("layers/attention/q_proj", "w", lambda c: (c.dim, c.n_heads * c.head_dim)),
    "attention.k_proj": ("layers/attention/k_proj", "w", lambda c: (c.dim, c.n_kv_heads * c.head_dim)),
    "attention.v_proj": ("layers/attention/v_proj", "w", lambda c: (c.dim, c.n_kv_heads * c.head_dim)),
    "attention.o_proj": ("layers/attention/o_proj", "w", lambda c: (c.n_heads * c.head_dim, c.dim)),
    "ffn_norm": ("layers/ffn_norm", "scale", lambda c: (c.dim,)),
    "mlp.gate_proj": ("layers/mlp/gate_proj", "w", lambda c: (c.dim, c.ffn_dim)),
    "mlp.up_proj": ("layers/mlp/up_proj", "w", lambda c: (c.dim, c.ffn_dim)),
    "mlp.down_proj": ("layers/mlp/down_proj", "w", lambda c: (c.ffn_dim, c.dim)),
}
_GLOBAL: dict[str, tuple[str, str, Callable[[LlamaConfig], Shape]]] = {
    "embed": ("embed", "embeddings", lambda c: (c.vocab_size, c.dim)),
    "final_norm": ("final_norm", "scale", lambda c: (c.dim,)),
    "lm_head": ("lm_head", "w", lambda c: (c.dim, c.vocab_size)),
}

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def store_tensors(config: LlamaConfig) -> list[tuple[str, Shape]]:
    """Every tensor of the store, in checkpoint order (embedding, layer by layer, norm, head)."""
    out = [("embed", _GLOBAL["embed"][2](config))]
    for i in range(config.n_layers):
        out += [(f"layers.{i}.{suffix}", spec[2](config)) for suffix, spec in _PER_LAYER.items()]
    out += [(name, _GLOBAL[name][2](config)) for name in ("final_norm", "lm_head")]
    return out


class ParamSpec:
    """One leaf of the Haiku parameter tree and where its values live in the store."""

    def __init__(self, module: str, name: str, shape: Shape, store_keys: list[str], stacked: bool):
        self.module, self.name, self.shape = module, name, shape
        self.store_keys = store_keys  # one key, or one per layer when stacked
        self.stacked = stacked

    @property
    def path(self) -> str:
        return f"{self.module}/{self.name}"

    def step_dtype(self, dtype: np.dtype) -> np.dtype:
        """The dtype the train step takes this tensor in when it is stored as `dtype`: stacked bf16
        weights as their uint16 bit patterns (llama.as_bits says why), everything else as stored."""
        dtype = np.dtype(dtype)
        return np.dtype(np.uint16) if self.stacked and dtype.name == "bfloat16" else dtype


def param_specs(config: LlamaConfig) -> list[ParamSpec]:
    specs = [ParamSpec(m, n, f(config), [key], False) for key, (m, n, f) in _GLOBAL.items()]
    for suffix, (m, n, f) in _PER_LAYER.items():
        keys = [f"layers.{i}.{suffix}" for i in range(config.n_layers)]
        specs.append(ParamSpec(m, n, (config.n_layers, *f(config)), keys, True))
    return specs
