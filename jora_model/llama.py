"""The Llama decoder as Haiku modules.

Shapes (see config.py): tokens [B, T]; activations [B, T, D]; queries [B, T, H, E]; keys/values
[B, T, K, E]; logits [B, T, V].

Parameter paths (the names sharding rules and LoRA targets match on; layout.py maps them to the store):
    embed/embeddings                    [V, D]
    layers/attention_norm/scale         [L, D]
    layers/attention/{q,k,v,o}_proj/w   [L, in, out]
    layers/ffn_norm/scale               [L, D]
    layers/mlp/{gate,up,down}_proj/w    [L, in, out]
    final_norm/scale                    [D]
    lm_head/w                           [D, V]
Per-layer weights are stacked on L and the decoder runs as one scanned layer (hk.layer_stack): one
compiled layer instead of L copies, and a natural unit for rematerialisation.

Rotary uses the rotate-half convention: feature i of a head pairs with feature i + E/2.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from .blocks import largest_divisor
from .config import LlamaConfig
from .lora import LoraSettings

_MASKED = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, never NaN


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    compute_dtype: str = "float32"  # activations and matmul inputs; "bfloat16" for training
    param_dtype: str = "float32"  # dtype of freshly initialised parameters (loaded ones keep theirs)
    remat: bool = False  # recompute each decoder layer in the backward pass instead of storing it
    scan_unroll: int = 1  # decoder layers per scan iteration (1 = fully rolled)
    lora: LoraSettings | None = None  # adapters on the targeted linear layers


def as_bits(params: dict) -> dict:
    """bf16 parameters as their uint16 bit patterns, for apply. XLA's CPU backend upcasts a bf16
    dynamic-slice to fp32, so slicing the stacked [L, ...] layer weights for the layer scan made it
    convert every frozen weight to fp32 and back, every step (5-8% of a step at `small`); slicing
    integers does not. `_get_parameter` turns them back into bf16, a free bitcast."""
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a,
                        params)


def _get_parameter(name, shape, dtype, init):
    value = hk.get_parameter(name, shape, dtype, init=init)
    return jax.lax.bitcast_convert_type(value, jnp.bfloat16) if value.dtype == jnp.uint16 else value


class Linear(hk.Module):
    """y = x @ w (no bias), plus the LoRA update when this layer is a LoRA target.

    The base matmul takes its operands in the compute dtype and accumulates in fp32, forward and
    backward (see `_matmul`). The adapter's two thin matmuls run in fp32 from its fp32 weights, as
    PEFT runs them: they cost r/out of the base matmul, and their gradients are the trained ones."""

    def __init__(self, out_features: int, options: ModelOptions, name: str, training: bool = False):
        super().__init__(name=name)
        self.out_features = out_features
        self.options = options
        self.training = training

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        fan_in = x.shape[-1]
        w = _get_parameter("w", [fan_in, self.out_features], jnp.dtype(self.options.param_dtype),
                             init=hk.initializers.RandomNormal(stddev=fan_in ** -0.5))
        cdt = jnp.dtype(self.options.compute_dtype)
        x = x.astype(cdt)
        y = _matmul(x, w.astype(cdt))
        lora = self.options.lora
        if lora is not None and self.module_name.rsplit("/", 1)[-1] in lora.targets:
            bound = fan_in ** -0.5
            a = hk.get_parameter("lora_a", [fan_in, lora.r], jnp.float32,
                                 init=hk.initializers.RandomUniform(-bound, bound))
            b = hk.get_parameter("lora_b", [lora.r, self.out_features], jnp.float32, init=jnp.zeros)
            h = x.astype(jnp.float32)
            if self.training and lora.dropout > 0:
                h = hk.dropout(hk.next_rng_key(), lora.dropout, h)
            y = y + lora.scale * _matmul(_matmul(h, a), b)
        return y.astype(cdt)


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:  # [..., in] x [in, out] -> [..., out] fp32
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _matmul_fwd(x, w):
    return _matmul(x, w), (x, w)


def _matmul_bwd(residuals, grad):
    """The backward matmuls in the operands' dtype with fp32 accumulation, like the forward. Left to
    autodiff, the fp32 cotangent of the fp32 output would promote the bf16 weight to fp32: every step
    would convert the frozen weights and run the backward at fp32 speed (half the forward's on CPUs
    with bf16 units, a quarter or less on GPUs)."""
    x, w = residuals
    grad = grad.astype(x.dtype)
    dx = jnp.matmul(grad, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("...i,...o->io", x, grad, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Embed(hk.Module):
    def __init__(self, vocab_size: int, dim: int, options: ModelOptions, name: str = "embed"):
        super().__init__(name=name)
        self.shape, self.options = (vocab_size, dim), options

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        table = _get_parameter("embeddings", self.shape, jnp.dtype(self.options.param_dtype),
                                 init=hk.initializers.RandomNormal(1.0))
        return jnp.take(table, tokens, axis=0).astype(self.options.compute_dtype)


class RMSNorm(hk.Module):
    def __init__(self, eps: float, options: ModelOptions, name: str):
        super().__init__(name=name)
        self.eps = eps
        self.options = options

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        scale = _get_parameter("scale", [x.shape[-1]], jnp.dtype(self.options.param_dtype), init=jnp.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        cdt = jnp.dtype(self.options.compute_dtype)
        # Like both references: normalise in fp32, cast back, then scale.
        return normed.astype(cdt) * scale.astype(cdt)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin, [B, T, E], for the rotate-half convention; computed in fp32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # x [B, T, N, E]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] boolean: causal, and only within the same segment (packed examples stay apart)."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its own segment, so a packed example sees positions 0, 1, ..."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


_QUERY_BLOCK = 512  # queries per block: one block's fp32 [T, S] scores are alive at a time


def _probs(q, k, mask):
    """Softmax attention weights [B, K, R, T, S] in fp32."""
    scores = jnp.einsum("btkre,bske->bkrts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    return jax.nn.softmax(scores, axis=-1)


def _attend_block(q, k, v, mask):
    probs = _probs(q, k, mask)
    return jnp.einsum("bkrts,bske->btkre", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def _block_grads(q, k, v, mask, out, grad):
    """(dq, dk, dv) of one query block, dk and dv in fp32 (partial sums over the blocks)."""
    dtype, f32 = q.dtype, jnp.float32
    probs = _probs(q, k, mask)
    dv = jnp.einsum("bkrts,btkre->bske", probs.astype(dtype), grad, preferred_element_type=f32)
    dprobs = jnp.einsum("btkre,bske->bkrts", grad, v, preferred_element_type=f32)
    # softmax backward: ds = p * (dp - sum_s p dp), and sum_s p dp = sum_e dout * out since out = p v
    row = jnp.sum(grad.astype(f32) * out.astype(f32), axis=-1).transpose(0, 2, 3, 1)  # [B, K, R, T]
    dscores = (probs * (dprobs - row[..., None]) * (q.shape[-1] ** -0.5)).astype(dtype)
    dq = jnp.einsum("bkrts,bske->btkre", dscores, k, preferred_element_type=f32)
    dk = jnp.einsum("bkrts,btkre->bske", dscores, q, preferred_element_type=f32)
    return dq.astype(dtype), dk, dv


def _query_blocks(t: int) -> int:
    """Number of query blocks: T over its largest divisor not above _QUERY_BLOCK."""
    return t // largest_divisor(t, _QUERY_BLOCK)


def _split(x, n):  # [B, T, ...] -> [n, B, T / n, ...]
    return x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]).swapaxes(0, 1)


def _join(x):  # [n, B, T / n, ...] -> [B, T, ...]
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


@jax.custom_vjp
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B, T, K, R, E], k/v [B, S, K, E], mask [B, T, S] -> [B, T, K, R, E] in
    q's dtype. Scores, softmax and accumulation in fp32; matmul operands in q's dtype. Long sequences
    run in blocks of queries, so the fp32 [T, S] scores never exist whole."""
    n = _query_blocks(q.shape[1])
    if n == 1:
        return _attend_block(q, k, v, mask)
    return _join(jax.lax.map(lambda xs: _attend_block(xs[0], k, v, xs[1]), (_split(q, n), _split(mask, n))))


def _attend_fwd(q, k, v, mask):
    out = attend(q, k, v, mask)
    return out, (q, k, v, mask, out)


def _attend_bwd(residuals, grad):
    """FlashAttention's backward, tiled over query blocks only: the [T, S] weights are recomputed from
    q and k instead of being kept from the forward (only q, k, v and the output are), and every matmul
    takes operands in the compute dtype with fp32 accumulation, as in the forward. Autodiff would run
    these matmuls in fp32 on the fp32 cotangent and keep fp32 [T, S] residuals."""
    q, k, v, mask, out = residuals
    grad = grad.astype(q.dtype)
    n = _query_blocks(q.shape[1])
    if n == 1:
        dq, dk, dv = _block_grads(q, k, v, mask, out, grad)
    else:
        def block(carry, xs):
            dq, dk, dv = _block_grads(xs[0], k, v, xs[1], xs[2], xs[3])
            return (carry[0] + dk, carry[1] + dv), dq

        zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        (dk, dv), dq = jax.lax.scan(block, zeros, tuple(_split(x, n) for x in (q, mask, out, grad)))
        dq = _join(dq)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(hk.Module):
    def __init__(self, config: LlamaConfig, options: ModelOptions, training: bool, name: str = "attention"):
        super().__init__(name=name)
        self.c, self.o, self.training = config, options, training

    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None):
        """mask [B, T, S]. With `cache` ([B, S, K, E] keys and values of this layer), the new keys and
        values are written at cache_index and attention runs over the whole cache; returns
        (output, updated cache) then, else the output alone."""
        c, o = self.c, self.o
        b, t, _ = x.shape
        e, k_heads, rep = c.head_dim, c.n_kv_heads, c.n_rep
        q = Linear(c.n_heads * e, o, "q_proj", self.training)(x).reshape(b, t, c.n_heads, e)
        k = Linear(k_heads * e, o, "k_proj", self.training)(x).reshape(b, t, k_heads, e)
        v = Linear(k_heads * e, o, "v_proj", self.training)(x).reshape(b, t, k_heads, e)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            at = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        # Query head h = kv * rep + r reads KV head kv = h // rep: group queries instead of copying K/V.
        q = q.reshape(b, t, k_heads, rep, e)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask).reshape(b, t, c.n_heads * e)
        out = Linear(c.dim, o, "o_proj", self.training)(out)
        return out if cache is None else (out, (k, v))


class MLP(hk.Module):
    def __init__(self, config: LlamaConfig, options: ModelOptions, training: bool, name: str = "mlp"):
        super().__init__(name=name)
        self.c, self.o, self.training = config, options, training

    def __call__(self, x: jax.Array) -> jax.Array:
        c, o = self.c, self.o
        gate = Linear(c.ffn_dim, o, "gate_proj", self.training)(x)
        up = Linear(c.ffn_dim, o, "up_proj", self.training)(x)
        return Linear(c.dim, o, "down_proj", self.training)(jax.nn.silu(gate) * up)


def decoder_layer(config: LlamaConfig, options: ModelOptions, training: bool) -> Callable:
    def layer(x, mask, cos, sin):
        attention = Attention(config, options, training)
        h = x + attention(RMSNorm(config.norm_eps, options, "attention_norm")(x), mask, cos, sin)
        out = h + MLP(config, options, training)(RMSNorm(config.norm_eps, options, "ffn_norm")(h))
        return out, mask, cos, sin

    return hk.remat(layer) if options.remat else layer


class KVCache(NamedTuple):
    """Keys and values of every layer for generation: [L, B, S, K, E] each."""
    k: jax.Array
    v: jax.Array


def empty_cache(config: LlamaConfig, batch: int, length: int, dtype: str) -> KVCache:
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cached_forward(config: LlamaConfig, options: ModelOptions, tokens: jax.Array, cache: KVCache,
                   cache_index: jax.Array) -> tuple[jax.Array, KVCache]:
    """tokens [B, T] at positions cache_index .. cache_index + T - 1 -> (logits [B, T, V], cache).
    Call inside hk.transform; the parameters are the same as llama_forward's."""
    t, length = tokens.shape[1], cache.k.shape[2]
    positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), tokens.shape)
    x = Embed(config.vocab_size, config.dim, options)(tokens)
    cos, sin = rotary_tables(positions, config.head_dim, config.rope_theta)
    # a query sees every cached key at or before its own position (later slots are empty or stale)
    mask = jnp.arange(length)[None, None, :] <= positions[:, :, None]

    def layer(x, per_layer):
        k_cache, v_cache = per_layer
        attention = Attention(config, options, False)
        h, (k_new, v_new) = attention(RMSNorm(config.norm_eps, options, "attention_norm")(x), mask, cos, sin,
                                      (k_cache, v_cache), cache_index)
        h = x + h
        out = h + MLP(config, options, False)(RMSNorm(config.norm_eps, options, "ffn_norm")(h))
        return out, (k_new, v_new)

    stack = hk.layer_stack(config.n_layers, with_per_layer_inputs=True, name="layers")
    x, (k_all, v_all) = stack(layer)(x, (cache.k, cache.v))
    x = RMSNorm(config.norm_eps, options, "final_norm")(x)
    return Linear(config.vocab_size, options, "lm_head")(x).astype(jnp.float32), KVCache(k_all, v_all)


def llama_forward(config: LlamaConfig, options: ModelOptions, tokens: jax.Array,
                  segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                  training: bool = False, hidden: bool = False) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] in fp32. Call inside hk.transform.

    segment_ids [B, T] (optional): tokens attend only within their own segment; positions default to
    each token's offset inside its segment, so packing does not change any example's logits.
    training: LoRA dropout on (needs an rng in apply).
    hidden: return the final-normed hidden states [B, T, D] in the compute dtype instead of the
    logits (the loss applies lm_head/w itself, chunk by chunk: see loss.py).
    """
    if segment_ids is None:
        segment_ids = jnp.zeros(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    x = Embed(config.vocab_size, config.dim, options)(tokens)
    cos, sin = rotary_tables(positions, config.head_dim, config.rope_theta)
    mask = attention_mask(segment_ids)
    stack = hk.layer_stack(config.n_layers, name="layers", unroll=options.scan_unroll)
    x, *_ = stack(decoder_layer(config, options, training))(x, mask, cos, sin)
    x = RMSNorm(config.norm_eps, options, "final_norm")(x)
    if hidden:
        return x
    return Linear(config.vocab_size, options, "lm_head")(x).astype(jnp.float32)


def transformed(config: LlamaConfig, options: ModelOptions) -> hk.Transformed:
    """The pure (init, apply) pair: apply(params, rng, tokens, segment_ids=None, positions=None,
    training=False, hidden=False)."""
    return hk.transform(lambda tokens, segment_ids=None, positions=None, training=False, hidden=False:
                        llama_forward(config, options, tokens, segment_ids, positions, training, hidden))


def transformed_cached(config: LlamaConfig, options: ModelOptions) -> hk.Transformed:
    """apply(params, None, tokens, cache, cache_index) -> (logits, cache), for generation."""
    return hk.transform(lambda tokens, cache, cache_index: cached_forward(config, options, tokens, cache,
                                                                         cache_index))
