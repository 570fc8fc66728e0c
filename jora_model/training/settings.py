"""What a training run is asked to do: one frozen dataclass, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jora_model.backends import check_kernels
from jora_model.errors import JoraError
from jora_model.model.lora import LoraSettings
from jora_model.model.remat import check_policy


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    lora: LoraSettings = LoraSettings()
    lr: float = 1e-4  # peak learning rate
    batch_size: int = 1  # rows per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    max_seq_len: int = 2000  # longest row accepted (rows are padded to multiples of pad_multiple)
    epochs: int = 7
    max_steps: int | None = None  # stop after this many optimizer steps, whatever the epochs
    seed: int = 420  # data order, LoRA init and dropout
    eval_every: int = 100  # optimizer steps between evaluations (0: only at the end)
    checkpoint_every: int = 100  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    mesh: str = ""  # "data=D,model=M"; empty: data=1, model=all devices
    compute_dtype: str = "bfloat16"  # activations; the frozen base keeps its stored dtype
    remat: str = "matmuls"  # what each decoder layer keeps for its backward: matmuls, layer or none (remat.py)
    warmup_ratio: float = 0.03  # share of the steps spent warming the learning rate up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    pad_multiple: int = 128
    eval_batch_size: int | None = None  # default: batch_size
    kernels: str = "auto"  # backend kernels: cpu, portable, or auto (cpu on a CPU, portable elsewhere)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_seq_len", "epochs", "keep_checkpoints", "pad_multiple"):
            if getattr(self, name) < 1:
                raise JoraError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise JoraError(f"max_steps must be at least 1, got {self.max_steps}")
        check_policy(self.remat)
        check_kernels(self.kernels)
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise JoraError(f"compute dtype must be bfloat16 or float32, got {self.compute_dtype!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise JoraError(f"learning rate must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lora": self.lora.to_dict()}
