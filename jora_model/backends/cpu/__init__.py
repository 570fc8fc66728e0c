"""The cpu kernel set: every XLA:CPU-specific form jora uses, behind `Kernels` (backends/__init__.py)."""

from __future__ import annotations

import jax

from jora_model.backends import Kernels
from jora_model.backends.cpu.attention import attend
from jora_model.backends.cpu.bits import as_bits, bits_dtype, from_bits
from jora_model.backends.cpu.compiler import COMPILER_OPTIONS, release_freed_memory
from jora_model.backends.cpu.kept import keep
from jora_model.backends.cpu.linear import lora_update, matmul
from jora_model.backends.cpu.reductions import shifted_exp
from jora_model.model.blocks import largest_divisor

# Logits of one loss chunk at most (fp32: 16 MiB, 128 tokens at V = 32000): small enough to stay in
# the CPU's caches between the head's product and the softmax that reads it.
LOGITS_PER_CHUNK = 1 << 22


def loss_chunk(batch: int, length: int, vocab: int) -> int:
    """Tokens per chunk: the largest divisor of the row length whose logits fit LOGITS_PER_CHUNK."""
    return largest_divisor(length, LOGITS_PER_CHUNK // (batch * vocab))


def head_in_loop(w: jax.Array) -> jax.Array:
    """The head behind a barrier: as a loop invariant, XLA's CPU compiler split dlogits @ w^T into a
    transpose of w hoisted out of the loop (a transposed copy of the head every step) and a slower
    product; carried behind a barrier, w no longer looks invariant and the product reads both
    operands as they lie."""
    return jax.lax.optimization_barrier(w)


CPU_KERNELS = Kernels(
    name="cpu", frozen_dtype=bits_dtype, encode_frozen=as_bits, decode_weight=from_bits, matmul=matmul,
    lora_update=lora_update, attention=attend, shifted_exp=shifted_exp, keep=keep, head_in_loop=head_in_loop,
    loss_chunk=loss_chunk, compiler_options=COMPILER_OPTIONS, after_compile=release_freed_memory)
