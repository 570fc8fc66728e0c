"""LoRA: low-rank adapters on the frozen base's linear layers, with PEFT's shapes and semantics.

    y = W x + scale * B(A(dropout(x))),   scale = alpha / r   (or alpha / sqrt(r) with rsLoRA)

A is [in, r], initialised like PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in));
B is [r, out], zero, so a fresh adapter leaves the model unchanged. Dropout acts only in training.
The adapter lives beside the frozen weight in the same Haiku module (`lora_a`, `lora_b`), stacked on
the layer axis like the weight; `split_params` separates the trainable tree from the frozen one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jora_model.model.config import LlamaConfig
from jora_model.schema import check_settings, setting
from jora_model.formats.layout import LINEAR_NAMES, param_specs

TRAINABLE_PREFIX = "lora_"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    r: int = setting(16, "rank of the update B A", gt=0, label="LoRA rank", option="--lora-r")
    alpha: float = setting(16.0, "scale numerator: the update is multiplied by alpha / r", gt=0, label="LoRA alpha",
                           option="--lora-alpha")
    dropout: float = setting(0.05, "dropout on the adapter's input, training only", ge=0, lt=1,
                             label="LoRA dropout", option="--lora-dropout")
    targets: tuple[str, ...] = setting(("q_proj", "v_proj"), "linear layers that get an adapter (PEFT's Llama "
                                       "default: q_proj, v_proj): any of " + " ".join(LINEAR_NAMES),
                                       choices=tuple(LINEAR_NAMES), label="LoRA targets")
    rslora: bool = setting(False, "scale by alpha / sqrt(r) instead (rank-stabilised LoRA)")

    def __post_init__(self) -> None:
        check_settings(self)
        object.__setattr__(self, "targets", tuple(t for t in LINEAR_NAMES if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoraSettings":
        values = dict(values)
        values["targets"] = tuple(values.get("targets", ()))
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def target_specs(config: LlamaConfig, lora: LoraSettings):
    """(module path, [L, in, out]) of every linear layer that gets an adapter."""
    return [(s.module, s.shape) for s in param_specs(config)
            if s.name == "w" and s.stacked and s.module.rsplit("/", 1)[-1] in lora.targets]


def init_lora_params(config: LlamaConfig, lora: LoraSettings, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """A fresh adapter in fp32 (the master copy): A ~ U(+-1/sqrt(in)), B = 0, for every layer."""
    rng = np.random.default_rng(seed)
    params: dict[str, dict[str, np.ndarray]] = {}
    for module, (layers, fan_in, fan_out) in target_specs(config, lora):
        bound = 1.0 / math.sqrt(fan_in)
        params[module] = {
            "lora_a": rng.uniform(-bound, bound, (layers, fan_in, lora.r)).astype(np.float32),
            "lora_b": np.zeros((layers, lora.r, fan_out), np.float32),
        }
    return params


def split_params(params: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    """(trainable, frozen) trees: LoRA leaves apart from the base model's."""
    trainable: dict[str, dict[str, Any]] = {}
    frozen: dict[str, dict[str, Any]] = {}
    for module, leaves in params.items():
        for name, value in leaves.items():
            side = trainable if name.startswith(TRAINABLE_PREFIX) else frozen
            side.setdefault(module, {})[name] = value
    return trainable, frozen


def merge_params(frozen: dict, trainable: dict) -> dict:
    out = {module: dict(leaves) for module, leaves in frozen.items()}
    for module, leaves in trainable.items():
        out.setdefault(module, {}).update(leaves)
    return out
