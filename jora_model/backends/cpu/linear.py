"""The frozen base's product and LoRA's update, with backward passes in the forms XLA's CPU dots read."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:  # [..., in] x [in, out] -> [..., out] fp32
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _matmul_fwd(x, w):
    return matmul(x, w), (x, w)


def _matmul_bwd(residuals, grad):
    """The backward matmuls in the operands' dtype with fp32 accumulation, like the forward. Left to
    autodiff, the fp32 cotangent of the fp32 output would promote the bf16 weight to fp32: every step
    would convert the frozen weights and run the backward at fp32 speed."""
    x, w = residuals
    grad = grad.astype(x.dtype)
    dx = jnp.matmul(grad, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("...i,...o->io", x, grad, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dot(x: jax.Array, y: jax.Array, x_axis: int, y_axis: int) -> jax.Array:
    """x and y contracted over one axis each, in fp32."""
    return jax.lax.dot_general(x, y, (((x_axis,), (y_axis,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def lora_update(h: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(h @ a) @ b in fp32: h [..., in], a [in, r], b [r, out] -> [..., out]."""
    return jnp.matmul(jnp.matmul(h, a, preferred_element_type=jnp.float32), b, preferred_element_type=jnp.float32)


def _lora_update_fwd(h, a, b):
    return lora_update(h, a, b), (h, a, b)


def _lora_update_bwd(residuals, grad):
    """Every product in a form XLA's CPU dots read without a transposed copy of a [tokens, in] operand.
    A product that sums over tokens (dA, dB: both operands hold tokens on their major axis) gets its
    left operand transposed by XLA; autodiff's dA = h^T g put h there. Here the thin [tokens, r]
    factor is on the left of both, and dA is computed as dA^T = g^T h, [r, in]."""
    h, a, b = residuals
    n, fan_in = math.prod(h.shape[:-1]), h.shape[-1]
    h2, g2 = h.reshape(n, fan_in), grad.reshape(n, grad.shape[-1]).astype(jnp.float32)
    # h @ a (recomputed: r N in multiplications) and its gradient, [N, r], then both transposed in
    # memory. The barriers keep XLA from folding the transposes into the products on either side,
    # which would then run as plain dots instead of YNNPACK's.
    ha, g_ha = jax.lax.optimization_barrier((_dot(h2, a, 1, 0), _dot(g2, b, 1, 1)))
    ha_t, g_ha_t = jax.lax.optimization_barrier((ha.T, g_ha.T))  # [r, N]
    db = _dot(ha_t, g2, 1, 0)  # [r, out]
    da = jax.lax.optimization_barrier(_dot(g_ha_t, h2, 1, 0)).T  # [in, r], computed as dA^T [r, in]
    dh = _dot(g_ha, a, 1, 1).reshape(h.shape)  # [..., in]
    return dh.astype(h.dtype), da, db


lora_update.defvjp(_lora_update_fwd, _lora_update_bwd)
