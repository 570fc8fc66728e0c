"""What a training run is asked to do: one frozen dataclass, checked when it is made.

Each field is defined once, with its bounds and help (jora_model.schema): `jora train`'s options and
the YAML's train section are read from these fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jora_model.backends import KERNELS
from jora_model.model.lora import LoraSettings
from jora_model.model.remat import POLICIES
from jora_model.schema import check_settings, setting
from jora_model.training.stop import LOSS_MARGIN, LOSS_WINDOW, ZERO_GRAD_STEPS


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    lora: LoraSettings = LoraSettings()
    lr: float = setting(1e-4, "peak learning rate (linear warmup, then cosine decay to 0)", gt=0,
                        label="learning rate")
    batch_size: int = setting(1, "rows per micro-batch (a multiple of the mesh's data size)", ge=1)
    grad_accum: int = setting(8, "micro-batches per optimizer step", ge=1)
    max_seq_len: int = setting(2000, "longest row in tokens (rows are padded to multiples of pad_multiple)", ge=8)
    epochs: int = setting(7, "passes over the training split", ge=1)
    max_steps: int | None = setting(None, "stop after this many optimizer steps, whatever the epochs", ge=1)
    seed: int = setting(420, "data order, adapter initialisation and dropout")
    eval_every: int = setting(100, "optimizer steps between evaluations on the held-out split (0: only at the end)",
                              ge=0)
    checkpoint_every: int = setting(100, "optimizer steps between checkpoints, and one at the end (a killed run "
                                    "resumes from the newest)", ge=1)
    keep_checkpoints: int = setting(3, "how many of the newest checkpoints to keep", ge=1)
    mesh: str = setting("", "device mesh, e.g. data=2,model=4 (empty: data=1, model=all devices)")
    compute_dtype: str = setting("bfloat16", "dtype of the activations (the frozen base keeps its stored dtype): "
                                 "bfloat16, or float32 for checks", choices=("bfloat16", "float32"),
                                 label="compute dtype")
    remat: str = setting("matmuls", "what each decoder layer keeps for its backward pass: matmuls (every matmul's "
                         "output; fastest), layer (its input and attention's output; least memory) or none "
                         "(no recompute)", choices=POLICIES)
    warmup_ratio: float = setting(0.03, "share of the steps spent warming the learning rate up", ge=0, le=1)
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping: the largest global gradient norm", gt=0)
    divergence_check: bool = setting(True, f"stop a run whose model diverged or died: a loss more than {LOSS_MARGIN:g} "
                                     f"nat above the mean of its first {LOSS_WINDOW} steps for {LOSS_WINDOW} steps in "
                                     f"a row, or a gradient norm of exactly 0 for {ZERO_GRAD_STEPS} (a NaN or "
                                     "infinite loss stops it either way)")
    pad_multiple: int = setting(128, "rows are padded to a multiple of this many tokens", ge=1, cli=False)
    eval_batch_size: int | None = setting(None, "rows per evaluation batch (default: batch_size)", ge=1, cli=False)
    kernels: str = setting("auto", "backend kernels: cpu (XLA:CPU's fast forms), portable (plain JAX, for GPUs and "
                           "TPUs), auto (cpu on a CPU, portable elsewhere)", choices=KERNELS)

    def __post_init__(self) -> None:
        check_settings(self)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lora": self.lora.to_dict()}
