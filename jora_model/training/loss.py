"""Next-token loss from the decoder's last hidden states, without holding the [B, T, V] logits.

The output head is the largest matmul of a small Llama (V = 32000) and its fp32 logits the largest
tensor of a step: 4 T V bytes per row, 262 MB at T = 2048, and autodiff keeps them (or their softmax)
for the backward pass. `head_nll` walks the sequence in chunks and, when differentiated, computes the
hidden states' gradient chunk by chunk in the forward pass itself (the loss is a sum, so its cotangent
is one scalar that the backward pass only multiplies in): one chunk's logits are alive at a time and
nothing is recomputed. The head weight is frozen (never a LoRA target), so it gets no gradient.

A tied head (Llama 3.2 1B/3B) is the embedding table itself, [V, D]: `vocab_major` says so, and
both products read the table as it lies (the logits contract its D axis, the hidden states' gradient
its V axis), so no transposed copy of it is made.

Shapes: hidden [B, T, D]; w [D, V] (or [V, D] when vocab_major); targets, weights [B, T].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jora_model.backends import kernels_for
from jora_model.model.config import LlamaConfig


def next_token_targets(input_ids: jax.Array, loss_mask: jax.Array,
                       segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Position t predicts token t+1: (targets [B, T], weights [B, T] in {0, 1} fp32). A target counts
    when it is a loss token of the same segment as its context; the last position has none."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    keep = loss_mask[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    weights = jnp.concatenate([keep, jnp.zeros_like(keep[:, :1])], axis=1).astype(jnp.float32)
    return targets, weights


def token_losses(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                 segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over target tokens, number of target tokens) from full logits [B, T, V]:
    the plain formulation, kept as the reference `head_nll` is tested against."""
    targets, weights = next_token_targets(input_ids, loss_mask, segment_ids)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weights), weights.sum()


def head_weight(params: dict, config: LlamaConfig) -> tuple[jax.Array, bool]:
    """(the head's weight as the parameters hold it, vocab_major): lm_head/w [D, V], or the embedding
    [V, D] when the config ties the head to it."""
    if config.tie_word_embeddings:
        return params["embed"]["embeddings"], True
    return params["lm_head"]["w"], False


def _head_nll(hidden, w, targets, weights, kernels: str, with_grad: bool, vocab_major: bool):
    b, t, d = hidden.shape
    w_vocab, w_dim = (0, 1) if vocab_major else (1, 0)  # w's vocabulary and model-dim axes
    vocab = w.shape[w_vocab]
    ops = kernels_for(kernels)
    c = ops.loss_chunk(b, t, vocab)

    def chunks(x):  # [B, T, ...] -> [T / c, B, c, ...]
        return x.reshape(b, t // c, c, *x.shape[2:]).swapaxes(0, 1)

    def body(carry, xs):
        total, w = carry
        # w is carried through the loop rather than closed over, so that a kernel set can hide it
        # from loop-invariant code motion (the cpu set's head_in_loop says why)
        w = ops.head_in_loop(w)
        h, target, weight = xs
        logits = jax.lax.dot_general(h, w, (((2,), (w_dim,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [B, c, V]
        # logsumexp by hand: its exponentials, exp(logits - max), are the softmax's numerators too,
        # so the gradient below reuses them instead of a second exp over [c, V]
        top, shifted, sum_exp = ops.shifted_exp(logits)
        lse = top + jnp.log(sum_exp)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        total = total + jnp.sum((lse - picked) * weight)
        if not with_grad:
            return (total, w), None
        # d nll / d logits = softmax - one_hot(target), for the weighted tokens
        dlogits = (shifted * (weight / sum_exp)[..., None]
                   - jax.nn.one_hot(target, vocab, dtype=jnp.float32) * weight[..., None]).astype(h.dtype)
        # dh = dlogits @ w^T, contracted on w's vocabulary axis: both read as they lie, no transpose
        dh = jax.lax.dot_general(dlogits, w, (((2,), (w_vocab,)), ((), ())), preferred_element_type=jnp.float32)
        return (total, w), dh.astype(h.dtype)  # dh [B, c, D]

    (total, _), dh = jax.lax.scan(body, (jnp.float32(0), w), (chunks(hidden), chunks(targets), chunks(weights)))
    if with_grad:
        dh = dh.swapaxes(0, 1).reshape(b, t, d)
    return total, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_nll(hidden: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
             kernels: str = "auto", vocab_major: bool = False) -> jax.Array:
    """sum over tokens of weight * -log softmax(hidden @ w)[target] (hidden @ w.T when vocab_major),
    fp32; matmul operands in hidden's dtype with fp32 accumulation."""
    return _head_nll(hidden, w.astype(hidden.dtype), targets, weights, kernels, False, vocab_major)[0]


def _head_nll_fwd(hidden, w, targets, weights, kernels, vocab_major):
    total, dh = _head_nll(hidden, w.astype(hidden.dtype), targets, weights, kernels, True, vocab_major)
    return total, dh


def _head_nll_bwd(kernels, vocab_major, dh, grad):
    return (dh * grad.astype(dh.dtype)).astype(dh.dtype), None, None, None


head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)


def losses_from_hidden(hidden: jax.Array, w: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                       segment_ids: jax.Array, kernels: str = "auto",
                       vocab_major: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over target tokens, number of target tokens), as token_losses gives
    from the logits hidden @ w (hidden @ w.T when vocab_major: the tied embedding, see head_weight);
    the head's chunks and row maxima are the kernel set's."""
    targets, weights = next_token_targets(input_ids, loss_mask, segment_ids)
    return head_nll(hidden, w, targets, weights, kernels, vocab_major), weights.sum()
