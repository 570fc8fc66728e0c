"""Dropout whose mask bits come from a keyed integer hash of each element's index.

`jax.random.bernoulli` draws its bits with threefry, which costs a sizeable share of a training step
on a CPU, twice over with a rematerialised layer (the backward pass redraws the mask); figures in
benchmarks/RESULTS.md. A mask needs neither a cryptographic generator nor a sequential one, only bits
that look independent across elements, layers, targets and steps. So a jax.random key yields two
32-bit words (one threefry call on two words), and each element's bits are two keyed rounds of
MurmurHash3's 32-bit finaliser over its flat index: a dozen integer ops that XLA fuses into the
masking itself, on any backend.
The mask depends only on the key and the shape, not on dtype or sharding (the index is global), so
a step's masks are the same in fp32 and bf16, on one device or a mesh, and across a resume.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jora_model.errors import JoraError

_WORD = 1 << 32


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection on uint32 in which every input bit flips each output bit
    with probability close to 1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits of `shape`, a pure function of (key, shape)."""
    size = math.prod(shape)
    if size >= _WORD:
        raise JoraError(f"dropout over {size} elements: the element index must fit 32 bits")
    k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.uint32(0)
    # The golden-ratio multiplier spreads neighbouring indices before the first round.
    return _fmix32(_fmix32(index * jnp.uint32(0x9E3779B9) + k0) ^ k1)


def dropout(key: jax.Array, rate: float, x: jax.Array) -> jax.Array:
    """Inverted dropout: each element is zeroed with probability `rate` (to 2^-32) and the kept ones
    are divided by the exact probability of keeping, so the expectation is x."""
    if rate <= 0.0:
        return x
    threshold = min(round(rate * _WORD), _WORD - 1)
    keep = hash_bits(key, x.shape) >= jnp.uint32(threshold)
    scale = _WORD / (_WORD - threshold)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))
