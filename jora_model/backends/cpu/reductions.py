"""Row reductions in the forms XLA's CPU backend runs fast."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_TAIL = 16  # halving stops at this width (or at an odd one); a plain max finishes the rest


def row_max(x: jax.Array) -> jax.Array:
    """jnp.max(x, axis=-1), as a tree of elementwise maxima over halves of the last axis.

    XLA's CPU backend runs a max-reduction over the minor axis as a scalar loop (its sums are
    vectorised), while an elementwise maximum of two halves is vectorised (benchmarks/RESULTS.md has
    the figures). The result is the same, NaN included (both propagate it). Not for autodiff: at ties
    the gradient would be routed differently from jnp.max's. Not for a sharded minor axis either: on a
    vocabulary-sharded head each halving moves logit pieces between devices (the portable set's
    jnp.max needs one small all-reduce)."""
    while x.shape[-1] % 2 == 0 and x.shape[-1] > _TAIL:
        half = x.shape[-1] // 2
        x = jnp.maximum(x[..., :half], x[..., half:])
    return jnp.max(x, axis=-1)


def shifted_exp(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(row max m, exp(x - m), its row sum) over the last axis: softmax's numerators and denominator,
    and logsumexp = m + log(sum), from one exp over x."""
    top = row_max(x)
    exps = jnp.exp(x - top[..., None])
    return top, exps, jnp.sum(exps, axis=-1)
