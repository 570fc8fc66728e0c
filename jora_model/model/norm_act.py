"""RMSNorm and SwiGLU with their own backward passes.

Left to autodiff, both run their backward as a chain of bf16 elementwise ops, each of which XLA's
CPU compiler computes in fp32 and rounds back to bf16, with fp32 [T, D] intermediates written out
between its fusions. Written by hand, each backward is one fp32 pass per output (plus the norm's
one row reduction), rounded once. The forward passes compute what the references compute
(transformers' LlamaRMSNorm and LlamaMLP): the same fp32 normalisation, cast, then scale.

Shapes: x, gate, up [..., D or F]; scale [D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(x * r in fp32, r = 1 / sqrt(mean(x^2) + eps) [..., 1])."""
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return x32 * r, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """normalise(x) in fp32, cast to x's dtype, times scale in x's dtype (as both references do)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    normed, r = _normalise(x, eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype), (x, scale, r)


def _rms_norm_bwd(eps, residuals, grad):
    """d/dx of (x r) s with r = (mean x^2 + eps)^(-1/2): r (g s) - x r^3 mean(g s x)."""
    x, scale, r = residuals
    x32, g = x.astype(jnp.float32), grad.astype(jnp.float32)
    gs = g * scale.astype(jnp.float32)
    dx = r * gs - x32 * (r * r * r) * jnp.mean(gs * x32, axis=-1, keepdims=True)
    # the scale is frozen in LoRA training, so XLA drops this sum; it is here for completeness
    dscale = jnp.sum((g * (x32 * r)).reshape(-1, x.shape[-1]), axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, computed in fp32 and rounded once to gate's dtype."""
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, grad):
    """silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g)."""
    gate, up = residuals
    g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), grad.astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    return (d * u * s * (1.0 + g * (1.0 - s))).astype(gate.dtype), (d * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
