"""Backend kernels: the few operations whose fastest form depends on the compiler, behind one interface.

`cpu` holds the forms XLA's CPU backend runs fast (backends/cpu); `portable` is plain JAX, which XLA
compiles well on GPUs and TPUs and which runs on the CPU too, so both sets are tested here
(backends/portable). A run picks its set once, from its settings and its mesh's platform
(`resolve_kernels`), and passes the name down; the model, the loss and the step call only the
`Kernels` that `kernels_for` gives them, never a backend module directly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from jora_model.errors import JoraError

KERNELS = ("auto", "cpu", "portable")


def check_kernels(name: str) -> str:
    if name not in KERNELS:
        raise JoraError(f"kernels must be one of {', '.join(KERNELS)}, got {name!r}")
    return name


def resolve_kernels(name: str, platform: str | None = None) -> str:
    """The set a run uses: `auto` is cpu on a CPU and portable on any other platform (JAX's default
    backend when no platform is given)."""
    if check_kernels(name) != "auto":
        return name
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "cpu" if platform == "cpu" else "portable"


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One backend's forms of the operations below; shapes as in model/llama.py and training/loss.py."""

    name: str
    # (stored dtype, stacked: bool) -> the dtype a frozen tensor reaches the step in (the same bytes;
    # the cpu set takes stacked bf16 weights as integer bit patterns), and the two conversions:
    # params -> what the step hands the model, and a parameter as the model reads it.
    frozen_dtype: Callable
    encode_frozen: Callable
    decode_weight: Callable
    # (x [..., in], w [in, out]) -> [..., out]: the frozen base's product, operands in the compute
    # dtype, fp32 accumulation, backward in the operands' dtype.
    matmul: Callable
    # (h [..., in] fp32, a [in, r], b [r, out]) -> (h @ a) @ b in fp32.
    lora_update: Callable
    # (q [B, T, K, R, E], k, v [B, S, K, E], visibility, causal) -> [B, T, K, R, E] in q's dtype.
    attention: Callable
    # x [..., N] -> (row max [...], exp(x - max) [..., N], its row sum [...]).
    shifted_exp: Callable
    # x -> x, differentiable: marks a value its layer's remat policy keeps (model/remat.py KEPT_NAME).
    keep: Callable
    # The output head's weight inside the loss's chunk loop (the identity where nothing is needed).
    head_in_loop: Callable
    # (batch, row length, vocabulary) -> tokens per chunk of the loss head.
    loss_chunk: Callable
    # XLA compiler options for this set's programs, and what to do after each compilation.
    compiler_options: Mapping[str, str]
    after_compile: Callable[[], None]


def kernels_for(name: str, platform: str | None = None) -> Kernels:
    """The kernel set called `name` ("auto" resolved against `platform`)."""
    resolved = resolve_kernels(name, platform)
    if resolved == "cpu":
        from jora_model.backends.cpu import CPU_KERNELS

        return CPU_KERNELS
    from jora_model.backends.portable import portable_kernels

    return portable_kernels(platform)
