"""Grouped-query softmax attention with its own backward pass, in the forms XLA's CPU backend runs fast.

Shapes: q [B, T, K, R, E] (query head h = kv * R + r reads KV head kv), k and v [B, S, K, E].
Which keys a query sees is given by `Visibility` (model/attention.py), never by a [B, T, S] mask:
the mask of one block is rebuilt where it is used, from O(T) integers, so nothing of size T^2 is
kept between layers or between the forward and the backward pass.

Causal self-attention (training) is cut into query blocks, and block i reads only keys up to its
own end: the key blocks after the diagonal are fully masked, so they are skipped instead of
computed and thrown away (at 4 blocks this is 10 of 16 tiles; at 8, 36 of 64). Scores, softmax and
accumulation are fp32; matmul operands stay in the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jora_model.backends.cpu.kept import kept_bits
from jora_model.backends.cpu.reductions import shifted_exp
from jora_model.model.attention import Visibility
from jora_model.model.blocks import largest_divisor
from jora_model.model.remat import KEPT_NAME

_MASKED = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, never NaN
QUERY_BLOCK = 512  # most queries per block: one block's fp32 [Tq, S] scores are alive at a time
CAUSAL_BLOCKS = 4  # causal attention cuts T into at least this many query blocks (T permitting)


def block_length(t: int, causal: bool) -> int:
    """Queries per block: at most QUERY_BLOCK, and for causal attention small enough for
    CAUSAL_BLOCKS blocks, so that the skipped tiles above the diagonal are worth skipping."""
    limit = min(QUERY_BLOCK, -(-t // CAUSAL_BLOCKS)) if causal else QUERY_BLOCK
    return largest_divisor(t, limit)


def _heads(x: jax.Array) -> jax.Array:
    """Head-major: q [B, T, K, R, E] -> [B, K, R, T, E]; k, v [B, S, K, E] -> [B, K, S, E]. Every
    product of a block then has its batch dims (B, K) leading and its operands in the layout XLA's
    CPU dot reads, so each tensor is transposed once per layer, not once per block and product."""
    return x.transpose(0, 2, 3, 1, 4) if x.ndim == 5 else x.transpose(0, 2, 1, 3)


def _scores(q, kt, visibility):
    """Scaled, masked scores [B, K, R, Tq, S] in fp32; q [B, K, R, Tq, E], kt = k^T [B, K, E, S]."""
    scores = jnp.einsum("bkrte,bkes->bkrts", q, kt, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.where(visibility.mask()[:, None, None], scores, _MASKED)


def _attend_block(q, kt, v, visibility):
    """(output [B, K, R, Tq, E] in q's dtype, row max and row sum of exp(scores - max), [B, K, R, Tq]
    fp32), all head-major. The output is normalised after the value matmul: Tq x E divisions, not Tq x S."""
    scores = _scores(q, kt, visibility)
    top, weights, total = shifted_exp(scores)
    out = jnp.einsum("bkrts,bkse->bkrte", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total[..., None]).astype(q.dtype), top, total


def _block_grads(q, k, kt, vt, visibility, row, top, total, grad):
    """(dq, dk^T, dv^T) of one query block, head-major; dk^T and dv^T [B, K, E, S] in fp32 (partial
    sums over the blocks). They are computed transposed so that the [Tq, S] probabilities and their
    gradient are read row by row, as written, never copied transposed. The forward's row statistics
    give the softmax in one pass over the scores, without its reductions; row = sum_e dout * out,
    which equals sum_s p dp since out = p v."""
    dtype, f32 = q.dtype, jnp.float32
    probs = jnp.exp(_scores(q, kt, visibility) - top[..., None]) * (1.0 / total)[..., None]
    dvt = jnp.einsum("bkrte,bkrts->bkes", grad, probs.astype(dtype), preferred_element_type=f32)
    dprobs = jnp.einsum("bkrte,bkes->bkrts", grad, vt, preferred_element_type=f32)
    dscores = (probs * (dprobs - row[..., None]) * (q.shape[-1] ** -0.5)).astype(dtype)  # softmax backward
    dq = jnp.einsum("bkrts,bkse->bkrte", dscores, k, preferred_element_type=f32)
    dkt = jnp.einsum("bkrte,bkrts->bkes", q, dscores, preferred_element_type=f32)
    return dq.astype(dtype), dkt, dvt


def _split(x, n, axis):  # n query blocks along `axis`, stacked first: [..., T, ...] -> [n, ..., T / n, ...]
    x = x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _join(x, axis):  # the inverse of _split
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


def _query_blocks(visibility, n):  # the queries' half of Visibility, [n, B, T / n] each
    return _split(visibility.q_index, n, 1), _split(visibility.q_segment, n, 1)


def _forward(q, k, v, visibility, causal):
    """(output [B, T, K, R, E], row max, row sum [B, K, R, T]) over all query blocks."""
    t = q.shape[1]
    n = t // block_length(t, causal)
    q, v = _heads(q), _heads(v)
    kt = _heads(k).swapaxes(-1, -2)
    if n == 1:
        out, top, total = _attend_block(q, kt, v, visibility)
    elif causal:
        size = t // n
        blocks = [_attend_block(q[:, :, :, i * size:(i + 1) * size], kt[..., :(i + 1) * size], v[:, :, :(i + 1) * size],
                                visibility.rows(i * size, (i + 1) * size).keys((i + 1) * size))
                  for i in range(n)]
        out, top, total = (jnp.concatenate([b[j] for b in blocks], axis=3) for j in range(3))
    else:
        out, top, total = jax.lax.map(
            lambda xs: _attend_block(xs[0], kt, v, visibility._replace(q_index=xs[1], q_segment=xs[2])),
            (_split(q, n, 3), *_query_blocks(visibility, n)))
        out, top, total = (_join(x, 3) for x in (out, top, total))
    return out.transpose(0, 3, 1, 2, 4), top, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, visibility: Visibility, causal: bool = False) -> jax.Array:
    """Attention output [B, T, K, R, E] in q's dtype. causal=True promises what Visibility.causal
    gives (S = T, indices 0..T-1 on both sides), so keys past a query block's end are never read."""
    return _forward(q, k, v, visibility, causal)[0]


def _attend_fwd(q, k, v, visibility, causal):
    out, top, total = _forward(q, k, v, visibility, causal)
    # Named, so that a rematerialised layer can keep them (model/remat.py) and skip attention's forward
    out = kept_bits(out)
    top, total = (checkpoint_name(x, KEPT_NAME) for x in (top, total))
    return out, (q, k, v, visibility, out, top, total)


def _attend_bwd(causal, residuals, grad):
    """FlashAttention's backward, tiled over query blocks: the [T, S] weights are recomputed from q
    and k and the forward's row statistics instead of being kept from the forward (only q, k, v, the
    output and [T] statistics are), and every matmul takes operands in the compute dtype with fp32
    accumulation, as in the forward. Autodiff would run these matmuls in fp32 on the fp32 cotangent
    and keep fp32 [T, S] residuals."""
    q, k, v, visibility, out, top, total = residuals
    grad = grad.astype(q.dtype)
    t = q.shape[1]
    n = t // block_length(t, causal)
    no_grads = jax.tree.map(lambda _: None, visibility)
    row = jnp.sum(grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 3, 1)
    q, k, grad = _heads(q), _heads(k), _heads(grad)
    kt, vt = k.swapaxes(-1, -2), _heads(v).swapaxes(-1, -2)
    if n == 1:
        dq, dkt, dvt = _block_grads(q, k, kt, vt, visibility, row, top, total, grad)
    elif causal:
        size = t // n
        dkt, dvt = jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32)
        dqs = []
        for i in range(n):
            rows, end = slice(i * size, (i + 1) * size), (i + 1) * size
            dq_i, dkt_i, dvt_i = _block_grads(q[:, :, :, rows], k[:, :, :end], kt[..., :end], vt[..., :end],
                                              visibility.rows(i * size, end).keys(end), row[..., rows],
                                              top[..., rows], total[..., rows], grad[:, :, :, rows])
            dqs.append(dq_i)
            dkt, dvt = dkt.at[..., :end].add(dkt_i), dvt.at[..., :end].add(dvt_i)
        dq = jnp.concatenate(dqs, axis=3)
    else:
        def block(carry, xs):
            q_i, q_index, q_segment, row_i, top_i, total_i, grad_i = xs
            rows = visibility._replace(q_index=q_index, q_segment=q_segment)
            dq_i, dkt_i, dvt_i = _block_grads(q_i, k, kt, vt, rows, row_i, top_i, total_i, grad_i)
            return (carry[0] + dkt_i, carry[1] + dvt_i), dq_i

        zeros = (jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32))
        (dkt, dvt), dq = jax.lax.scan(block, zeros, (
            _split(q, n, 3), *_query_blocks(visibility, n), *(_split(x, n, 3) for x in (row, top, total)),
            _split(grad, n, 3)))
        dq = _join(dq, 3)
    back = (0, 3, 1, 2)  # [B, K, E, S] -> [B, S, K, E]
    dk, dv = dkt.transpose(back).astype(k.dtype), dvt.transpose(back).astype(v.dtype)
    return dq.transpose(0, 3, 1, 2, 4), dk, dv, no_grads


attend.defvjp(_attend_fwd, _attend_bwd)
