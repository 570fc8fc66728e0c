"""The portable kernel set: plain JAX, which XLA compiles well on GPUs and TPUs.

- attention is `jax.nn.dot_product_attention`: cuDNN's fused kernel on NVIDIA GPUs where it takes the
  shapes and dtypes (is_causal lets it skip the tiles above the diagonal), XLA's elsewhere; packed
  rows keep their segments through the mask.
- the base's products return the compute dtype (bf16 in training) from fp32 accumulation, so a
  tensor-parallel product's all-reduce carries bf16, and autodiff's backward stays in bf16;
- row maxima are `jnp.max`, which a vocabulary-sharded head reduces with one small all-reduce;
- remat keeps named values as they are; the loss head works on chunks of a fixed number of tokens,
  large enough to fill an accelerator's matrix units.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jora_model.backends import Kernels
from jora_model.model.attention import Visibility
from jora_model.model.blocks import largest_divisor
from jora_model.model.remat import KEPT_NAME

log = logging.getLogger(__name__)

LOSS_CHUNK_TOKENS = 1024  # tokens (over the batch) per chunk of the loss head


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """[..., in] x [in, out] -> [..., out] in x's dtype; XLA accumulates in fp32 on GPUs and TPUs."""
    return jnp.matmul(x, w)


def lora_update(h: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(h @ a) @ b in fp32: h [..., in], a [in, r], b [r, out] -> [..., out]."""
    return jnp.matmul(jnp.matmul(h, a, preferred_element_type=jnp.float32), b, preferred_element_type=jnp.float32)


def shifted_exp(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(row max m, exp(x - m), its row sum) over the last axis."""
    top = jnp.max(x, axis=-1)
    exps = jnp.exp(x - top[..., None])
    return top, exps, jnp.sum(exps, axis=-1)


def keep(x: jax.Array) -> jax.Array:
    return checkpoint_name(x, KEPT_NAME)


def loss_chunk(batch: int, length: int, vocab: int) -> int:
    return largest_divisor(length, max(1, LOSS_CHUNK_TOKENS // batch))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, visibility: Visibility, causal: bool = False,
              implementation: str | None = None) -> jax.Array:
    """q [B, T, K, R, E], k and v [B, S, K, E] -> [B, T, K, R, E]. Query head h = kv * R + r reads
    KV head kv, as jax.nn.dot_product_attention groups them."""
    b, t, kv_heads, rep, e = q.shape
    out = jax.nn.dot_product_attention(q.reshape(b, t, kv_heads * rep, e), k, v, mask=visibility.mask()[:, None],
                                       is_causal=causal, implementation=implementation)
    return checkpoint_name(out.reshape(q.shape), KEPT_NAME)


def fused_attention(q, k, v, visibility, causal=False):
    """cuDNN's fused attention where it takes these shapes and dtypes (it says so while tracing),
    else XLA's."""
    try:
        return attention(q, k, v, visibility, causal, "cudnn")
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        log.info("cuDNN attention refused %s %s (%s): using XLA's", q.shape, q.dtype, str(exc).splitlines()[0])
        return attention(q, k, v, visibility, causal, "xla")


def _as_stored(dtype, stacked: bool):
    return dtype


def _nothing() -> None:
    pass


@functools.lru_cache(maxsize=None)
def portable_kernels(platform: str | None = None) -> Kernels:
    if platform is None:
        platform = jax.default_backend()
    return Kernels(
        name="portable", frozen_dtype=_as_stored, encode_frozen=lambda params: params, decode_weight=lambda a: a,
        matmul=matmul, lora_update=lora_update, attention=fused_attention if platform in ("gpu", "cuda") else attention,
        shifted_exp=shifted_exp, keep=keep, head_in_loop=lambda w: w, loss_chunk=loss_chunk,
        compiler_options={}, after_compile=_nothing)
