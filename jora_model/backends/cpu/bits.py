"""Frozen layer weights as their bit patterns, for the cpu kernels.

XLA's CPU backend upcasts a bf16 dynamic-slice to fp32, so slicing the stacked [L, ...] weights for
the layer scan made it convert every frozen weight to fp32 and back, every step; slicing integers
does not. The step therefore takes the stacked bf16 weights as uint16 bit patterns (the trainer loads
them so: store.load_params with `bits_dtype`) and the model reads each one back as bf16, a free bitcast.
Unstacked weights (embedding, head) stay bf16: they are not sliced, and a bitcast there would cost a
copy for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_bits(params: dict) -> dict:
    """The stacked bf16 layer weights as uint16 bit patterns; a no-op for weights loaded as bits."""
    from jora_model.formats.names import STACK

    return {module: {name: jax.lax.bitcast_convert_type(a, jnp.uint16)
                     if module.startswith(STACK + "/") and a.dtype == jnp.bfloat16 else a
                     for name, a in leaves.items()}
            for module, leaves in params.items()}


def bits_dtype(dtype, stacked: bool) -> np.dtype:
    """The dtype the step takes a frozen tensor stored as `dtype` in: uint16 for stacked bf16 weights."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if stacked and dtype.name == "bfloat16" else dtype


def from_bits(a: jax.Array) -> jax.Array:
    """The bf16 array whose bit patterns `a` holds (as_bits' inverse); other arrays as they are."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a
