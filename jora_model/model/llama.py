"""The Llama decoder as Haiku modules.

Shapes (see config.py): tokens [B, T]; activations [B, T, D]; queries [B, T, H, E]; keys/values
[B, T, K, E]; logits [B, T, V].

Parameter paths (the names sharding rules and LoRA targets match on; formats/names.py names each in every format):
    embed/embeddings                    [V, D]
    layers/attention_norm/scale         [L, D]
    layers/attention/{q,k,v,o}_proj/w   [L, in, out]
    layers/ffn_norm/scale               [L, D]
    layers/mlp/{gate,up,down}_proj/w    [L, in, out]
    final_norm/scale                    [D]
    lm_head/w                           [D, V]  (absent when tied: the head reads embed/embeddings)
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

from jora_model.backends import Kernels, check_kernels, kernels_for
from jora_model.formats.names import STACK
from jora_model.model.attention import Visibility
from jora_model.model.config import LlamaConfig
from jora_model.model.dropout import dropout
from jora_model.model.lora import LoraSettings
from jora_model.model.norm_act import rms_norm, swiglu
from jora_model.model.remat import check_policy, keeps, remat_layer

@dataclasses.dataclass(frozen=True)
class ModelOptions:
    compute_dtype: str = "float32"  # activations and matmul inputs; "bfloat16" for training
    param_dtype: str = "float32"  # dtype of freshly initialised parameters (loaded ones keep theirs)
    remat: str = "none"  # what a decoder layer keeps for its backward pass: "matmuls", "layer" or
    # "none" (remat.py); the first two recompute the rest of the layer in the backward pass
    scan_unroll: int = 1  # decoder layers per scan iteration (1 = fully rolled)
    lora: LoraSettings | None = None  # adapters on the targeted linear layers
    kernels: str = "auto"  # the backend kernel set (backends/): cpu, portable, or auto (from JAX's default backend)

    def __post_init__(self) -> None:
        check_policy(self.remat)
        check_kernels(self.kernels)

    @property
    def kernel_set(self) -> Kernels:
        return kernels_for(self.kernels)


STACK_NAME = STACK  # the layer stack's module name (the name table's): its parameters are [L, ...]


def _weight(options: "ModelOptions", name, shape, dtype, init) -> jax.Array:
    """A parameter as the model computes with it (the kernel set may hand the step its bit patterns)."""
    return options.kernel_set.decode_weight(hk.get_parameter(name, shape, dtype, init=init))


def _kept(options: "ModelOptions", *, projection: bool) -> Callable[[jax.Array], jax.Array]:
    """What a decoder layer applies to a value its remat policy may keep (model/remat.py)."""
    return options.kernel_set.keep if keeps(options.remat, projection=projection) else (lambda x: x)


class Linear(hk.Module):
    """y = x @ w (no bias): operands in the compute dtype, fp32 accumulation, forward and backward
    (the kernel set's `matmul`)."""

    def __init__(self, out_features: int, options: ModelOptions, name: str, training: bool = False):
        super().__init__(name=name)
        self.out_features = out_features
        self.options = options
        self.training = training

    def product(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out], fp32 or the compute dtype
        fan_in = x.shape[-1]
        w = _weight(self.options, "w", [fan_in, self.out_features], jnp.dtype(self.options.param_dtype),
                    init=hk.initializers.RandomNormal(stddev=fan_in ** -0.5))
        cdt = jnp.dtype(self.options.compute_dtype)
        return self.options.kernel_set.matmul(x.astype(cdt), w.astype(cdt))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        return self.product(x).astype(self.options.compute_dtype)


class LoraLinear(Linear):
    """A base Linear plus the LoRA update: y = x @ w + scale * ((dropout(x) @ A) @ B) (model/lora.py).

    The adapter's two thin matmuls run in fp32 from its fp32 weights, as PEFT runs them: they cost r/out
    of the base matmul, and their gradients are the trained ones. Its parameters sit beside the base
    weight in the same module (`lora_a`, `lora_b`), so the base's names do not change."""

    def __init__(self, out_features: int, options: ModelOptions, name: str, training: bool = False):
        super().__init__(out_features, options, name, training)
        self.lora = options.lora

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.product(x)
        fan_in, lora = x.shape[-1], self.lora
        bound = fan_in ** -0.5
        a = hk.get_parameter("lora_a", [fan_in, lora.r], jnp.float32, init=hk.initializers.RandomUniform(-bound, bound))
        b = hk.get_parameter("lora_b", [lora.r, self.out_features], jnp.float32, init=jnp.zeros)
        h = x.astype(self.options.compute_dtype).astype(jnp.float32)
        if self.training and lora.dropout > 0:
            h = dropout(hk.next_rng_key(), lora.dropout, h)
        y = y + lora.scale * self.options.kernel_set.lora_update(h, a, b)
        return y.astype(self.options.compute_dtype)


def linear(out_features: int, options: ModelOptions, name: str, training: bool = False) -> Linear:
    """The layer called `name`: a LoraLinear when the settings target it, else the plain Linear."""
    targeted = options.lora is not None and name in options.lora.targets
    return (LoraLinear if targeted else Linear)(out_features, options, name, training)


class Embed(hk.Module):
    def __init__(self, vocab_size: int, dim: int, options: ModelOptions, name: str = "embed"):
        super().__init__(name=name)
        self.shape, self.options = (vocab_size, dim), options

    def table(self) -> jax.Array:  # [V, D]
        return _weight(self.options, "embeddings", self.shape, jnp.dtype(self.options.param_dtype),
                       init=hk.initializers.RandomNormal(1.0))

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.table(), tokens, axis=0).astype(self.options.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        """The tied output head: x @ table.T, contracted on both operands' last axis (no transposed copy
        of the table), operands in the compute dtype with fp32 accumulation, as Linear's product."""
        cdt = jnp.dtype(self.options.compute_dtype)
        return jax.lax.dot_general(x.astype(cdt), self.table().astype(cdt), (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)


def output_head(config: LlamaConfig, options: ModelOptions, embed: Embed, x: jax.Array) -> jax.Array:
    """Logits [B, T, V] in fp32 from the final hidden states: lm_head/w, or the embedding when tied;
    both round through the compute dtype as a Linear's output does."""
    if config.tie_word_embeddings:
        logits = embed.attend(x).astype(options.compute_dtype)
    else:
        logits = linear(config.vocab_size, options, "lm_head")(x)
    return logits.astype(jnp.float32)


class RMSNorm(hk.Module):
    def __init__(self, eps: float, options: ModelOptions, name: str):
        super().__init__(name=name)
        self.eps = eps
        self.options = options

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        scale = _weight(self.options, "scale", [x.shape[-1]], jnp.dtype(self.options.param_dtype), init=jnp.ones)
        return rms_norm(x.astype(self.options.compute_dtype), scale, self.eps)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """The E/2 rotary frequencies in fp32; with Llama 3.1's scaling as Meta's apply_scaling and
    transformers' _compute_llama3_parameters compute them: wavelengths longer than the original
    context / low_freq_factor are stretched by the factor, those shorter than original / high_freq_factor
    kept, and the band between blended smoothly."""
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if config.rope_scaling_factor is None:
        return inv_freq
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_len
    wavelen = (2 * np.pi / inv_freq).astype(np.float32)
    smooth = ((original / wavelen - low) / (high - low)).astype(np.float32)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, blended)
    return np.where(wavelen < original / high, inv_freq, scaled).astype(np.float32)


def rotary_tables(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin, [B, T, E], for the rotate-half convention; computed in fp32."""
    inv_freq = rope_inv_freq(config)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # x [B, T, N, E]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its own segment, so a packed example sees positions 0, 1, ..."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class Attention(hk.Module):
    def __init__(self, config: LlamaConfig, options: ModelOptions, training: bool, name: str = "attention"):
        super().__init__(name=name)
        self.c, self.o, self.training = config, options, training

    def __call__(self, x: jax.Array, visibility: Visibility, cos: jax.Array, sin: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None):
        """visibility: which keys each query sees (attention.py). With `cache` ([B, S, K, E] keys and
        values of this layer), the new keys and values are written at cache_index and attention runs
        over the whole cache; returns (output, updated cache) then, else the output alone."""
        c, o = self.c, self.o
        b, t, _ = x.shape
        e, k_heads, rep = c.head_dim, c.n_kv_heads, c.n_rep
        q = linear(c.n_heads * e, o, "q_proj", self.training)(x).reshape(b, t, c.n_heads, e)
        k = linear(k_heads * e, o, "k_proj", self.training)(x).reshape(b, t, k_heads, e)
        v = linear(k_heads * e, o, "v_proj", self.training)(x).reshape(b, t, k_heads, e)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:  # training or scoring: what the backward pass reads (model/remat.py)
            kept = _kept(o, projection=True)
            q, k, v = kept(q), kept(k), kept(v)
        else:
            at = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        # Query head h = kv * rep + r reads KV head kv = h // rep: group queries instead of copying K/V.
        q = q.reshape(b, t, k_heads, rep, e)
        out = o.kernel_set.attention(q, k.astype(q.dtype), v.astype(q.dtype), visibility, cache is None)
        out = out.reshape(b, t, c.n_heads * e)
        out = linear(c.dim, o, "o_proj", self.training)(out)
        return out if cache is None else (out, (k, v))


class MLP(hk.Module):
    def __init__(self, config: LlamaConfig, options: ModelOptions, training: bool, name: str = "mlp"):
        super().__init__(name=name)
        self.c, self.o, self.training = config, options, training

    def __call__(self, x: jax.Array) -> jax.Array:
        c, o = self.c, self.o
        gate = linear(c.ffn_dim, o, "gate_proj", self.training)(x)
        up = linear(c.ffn_dim, o, "up_proj", self.training)(x)
        kept = _kept(o, projection=True)
        gate, up = kept(gate), kept(up)
        return linear(c.dim, o, "down_proj", self.training)(swiglu(gate, up))


def decoder_layer(config: LlamaConfig, options: ModelOptions, training: bool) -> Callable:
    def layer(x, visibility, cos, sin):
        attention = Attention(config, options, training)
        x = _kept(options, projection=False)(x)
        h = x + attention(RMSNorm(config.norm_eps, options, "attention_norm")(x), visibility, cos, sin)
        # the residual stream after attention is o_proj's output plus x: kept with the projections
        h = _kept(options, projection=True)(h)
        out = h + MLP(config, options, training)(RMSNorm(config.norm_eps, options, "ffn_norm")(h))
        return out, visibility, cos, sin

    return remat_layer(layer, options.remat, hk.remat)


class KVCache(NamedTuple):
    """Keys and values of every layer for generation: [L, B, S, K, E] each."""
    k: jax.Array
    v: jax.Array


def empty_cache(config: LlamaConfig, batch: int, length: int, dtype: str) -> KVCache:
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cached_forward(config: LlamaConfig, options: ModelOptions, tokens: jax.Array, cache: KVCache,
                   cache_index: jax.Array, start: jax.Array | None = None,
                   last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """tokens [B, T] written at cache slots cache_index .. cache_index + T - 1 -> (logits [B, T, V], cache).
    Call inside hk.transform; the parameters are the same as llama_forward's.

    start [B] (optional, default 0): the slot of each row's first real token, for a batch of prompts of
    different lengths padded on the left. Slots before it are hidden from every query, and a token's
    rotary position is its slot minus start, so each row computes as it would alone.
    last_only: the logits of the last token only, [B, 1, V] (the head over a whole prompt is wasted work)."""
    b, t, length = tokens.shape[0], tokens.shape[1], cache.k.shape[2]
    start = jnp.zeros((b,), jnp.int32) if start is None else start.astype(jnp.int32)
    q_slots = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), tokens.shape)
    positions = jnp.maximum(q_slots - start[:, None], 0)
    embed = Embed(config.vocab_size, config.dim, options)
    x = embed(tokens)
    cos, sin = rotary_tables(positions, config)
    # A query sees every cached key at or before its own slot (later slots are empty or stale) in its own
    # segment: 1 from the row's start on, 0 for the left padding (whose queries see only padding, so no
    # row of the mask is empty).
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    visibility = Visibility(q_slots, slots, (q_slots >= start[:, None]).astype(jnp.int32),
                            (slots >= start[:, None]).astype(jnp.int32))

    def layer(x, per_layer):
        k_cache, v_cache = per_layer
        attention = Attention(config, options, False)
        h, (k_new, v_new) = attention(RMSNorm(config.norm_eps, options, "attention_norm")(x), visibility, cos, sin,
                                      (k_cache, v_cache), cache_index)
        h = x + h
        out = h + MLP(config, options, False)(RMSNorm(config.norm_eps, options, "ffn_norm")(h))
        return out, (k_new, v_new)

    stack = hk.layer_stack(config.n_layers, with_per_layer_inputs=True, name=STACK_NAME)
    x, (k_all, v_all) = stack(layer)(x, (cache.k, cache.v))
    x = RMSNorm(config.norm_eps, options, "final_norm")(x[:, -1:] if last_only else x)
    return output_head(config, options, embed, x), KVCache(k_all, v_all)


def llama_forward(config: LlamaConfig, options: ModelOptions, tokens: jax.Array,
                  segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                  training: bool = False, hidden: bool = False, select: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] in fp32. Call inside hk.transform.

    segment_ids [B, T] (optional): tokens attend only within their own segment; positions default to
    each token's offset inside its segment, so packing does not change any example's logits.
    training: LoRA dropout on (needs an rng in apply).
    hidden: return the final-normed hidden states [B, T, D] in the compute dtype instead of the
    logits (the loss applies the head itself, chunk by chunk: see loss.py's head_weight).
    select [B, R] (optional): the token indices of each row whose logits (or hidden states) alone are
    returned, [B, R, ...]: scoring a response needs no head over its prompt.
    """
    if segment_ids is None:
        segment_ids = jnp.zeros(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    embed = Embed(config.vocab_size, config.dim, options)
    x = embed(tokens)
    cos, sin = rotary_tables(positions, config)
    visibility = Visibility.causal(segment_ids)
    stack = hk.layer_stack(config.n_layers, name=STACK_NAME, unroll=options.scan_unroll)
    x, *_ = stack(decoder_layer(config, options, training))(x, visibility, cos, sin)
    if select is not None:
        x = jnp.take_along_axis(x, select[..., None].astype(jnp.int32), axis=1)
    x = RMSNorm(config.norm_eps, options, "final_norm")(x)
    if hidden:
        return x
    return output_head(config, options, embed, x)


def transformed(config: LlamaConfig, options: ModelOptions) -> hk.Transformed:
    """The pure (init, apply) pair: apply(params, rng, tokens, segment_ids=None, positions=None,
    training=False, hidden=False, select=None)."""
    return hk.transform(lambda tokens, segment_ids=None, positions=None, training=False, hidden=False, select=None:
                        llama_forward(config, options, tokens, segment_ids, positions, training, hidden, select))


def transformed_cached(config: LlamaConfig, options: ModelOptions) -> hk.Transformed:
    """apply(params, None, tokens, cache, cache_index, start=None, last_only=False) -> (logits, cache), for
    generation (start: cached_forward's left padding)."""
    return hk.transform(lambda tokens, cache, cache_index, start=None, last_only=False: cached_forward(
        config, options, tokens, cache, cache_index, start, last_only))
