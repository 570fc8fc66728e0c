"""How the cpu kernels keep a value for a rematerialised layer: as its bit pattern.

Kept values go through `keep`, which stores their bit pattern as unsigned integers under the remat
policies' checkpoint name. XLA's CPU compiler converts a bf16 stack that a loop slices to fp32 whole
before the loop (a copy at twice the size), and does not do so for integers; the backward pass
bitcasts the bits back, which is free. A bitcast to integers has no gradient, so `keep` is an
identity with its own VJP that passes the gradient straight through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jora_model.model.remat import KEPT_NAME

_UINT = {2: jnp.uint16, 4: jnp.uint32}


def kept_bits(x: jax.Array) -> jax.Array:
    """x, routed through its bit pattern under KEPT_NAME: a remat policy that saves KEPT_NAME keeps
    the integers. No gradient flows through it; for residuals of a custom VJP (attention's)."""
    bits = checkpoint_name(jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]), KEPT_NAME)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


@jax.custom_vjp
def keep(x: jax.Array) -> jax.Array:
    """The identity, differentiable; under remat its input is kept as bits (kept_bits)."""
    return x


def _keep_fwd(x):
    return kept_bits(x), None


def _keep_bwd(_, grad):
    return (grad,)


keep.defvjp(_keep_fwd, _keep_bwd)
