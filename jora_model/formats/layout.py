"""The base model's tensors as the parameter store and the Haiku tree hold them (names.py names them).

The store keeps one tensor per layer (`layers.3.attention.q_proj`) so conversion can stream tensor by
tensor; the model keeps each per-layer weight stacked on a leading L axis so the decoder runs as one
scanned layer. Matrices are stored [in, out] (the layout `x @ w` wants). Rotary: q_proj/k_proj output
features use the rotate-half convention (transformers'), not Meta's interleaved pairs. See README,
"Rotary convention".
"""

from __future__ import annotations

import numpy as np

from jora_model.formats.names import TABLE, Shape
from jora_model.model.config import LlamaConfig

# The linear layers LoRA can target, by their module's last name (as PEFT's target_modules name them)
LINEAR_NAMES = tuple(kind.lora_target for kind in TABLE.kinds if kind.lora)


def store_tensors(config: LlamaConfig) -> list[tuple[str, Shape]]:
    """Every tensor of the store, in checkpoint order (embedding, layer by layer, norm, head unless tied)."""
    return [(kind.store_name(layer), kind.shape(config)) for kind, layer in TABLE.tensors(config)]


class ParamSpec:
    """One leaf of the Haiku parameter tree and where its values live in the store."""

    def __init__(self, module: str, name: str, shape: Shape, store_keys: list[str], stacked: bool):
        self.module, self.name, self.shape = module, name, shape
        self.store_keys = store_keys  # one key, or one per layer when stacked
        self.stacked = stacked

    @property
    def path(self) -> str:
        return f"{self.module}/{self.name}"


def param_specs(config: LlamaConfig) -> list[ParamSpec]:
    """Every leaf of the Haiku tree: the global tensors, then the stacked per-layer ones."""
    kinds = TABLE.of(config).kinds
    specs = [ParamSpec(k.module, k.param, k.shape(config), [k.store_name()], False)
             for k in kinds if not k.per_layer]
    for k in [k for k in kinds if k.per_layer]:
        keys = [k.store_name(i) for i in range(config.n_layers)]
        specs.append(ParamSpec(k.module, k.param, (config.n_layers, *k.shape(config)), keys, True))
    return specs
