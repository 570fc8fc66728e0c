"""Batched greedy generation with the KV cache.

Prompts are sorted by length and generated `batch_size` at a time. A batch is padded on the left to a
bucket length, so every row's last prompt token sits in the same cache slot and all rows decode in step;
each row's start slot (llama.cached_forward's `start`) hides its padding and counts its positions, so a
row generates what it would alone. The whole loop (fill the cache with the prompts, then one token per
step until every row has stopped or max_new_tokens is reached) is one jitted function, compiled once per
(batch, prompt bucket, new-token bucket) shape and reused by every batch of that shape. A short last
batch is filled with idle rows rather than compiled again.

Shapes: B rows, T padded prompt length, N new-token bucket, S = T + N cache slots.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from jora_model.errors import JoraError

def bucket(n: int) -> int:
    """The padded length of n tokens: 64, 96, 128, 192, 256, 384, ... (a power of two or 1.5 times one):
    at most 1.5 times the work of the longest row, and two compiled shapes per doubling."""
    size = 64
    while n > size:
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2
    return size


def new_token_bucket(n: int) -> int:
    """The padded count of n new (or scored) tokens: a power of two, at least 16."""
    return max(16, 1 << (n - 1).bit_length())


class BatchedGreedy:
    """Greedy answers from a LoadedModel's parameters (base, or base + adapter)."""

    def __init__(self, model: Any, batch_size: int = 8):
        import jax

        from jora_model.model.llama import ModelOptions, transformed_cached

        if batch_size < 1:
            raise JoraError(f"batch size must be positive, got {batch_size}")
        self.params, self.batch_size = model.params, batch_size
        options = ModelOptions(compute_dtype=model.options.compute_dtype, lora=model.options.lora)
        apply = transformed_cached(model.config, options).apply
        self._loop = jax.jit(functools.partial(_greedy_loop, apply, model.config, options.compute_dtype),
                             static_argnames=("new_bucket",))

    def generate(self, prompts: Sequence[np.ndarray], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        """New token ids after each prompt (bos first), up to the first of `stop_ids` (left out)."""
        if any(len(p) == 0 for p in prompts):
            raise JoraError("empty prompt")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[list[int]] = [[] for _ in prompts]
        for first in range(0, len(order), self.batch_size):
            chosen = order[first:first + self.batch_size]
            for i, answer in zip(chosen, self._batch([prompts[i] for i in chosen], max_new_tokens, stop_ids)):
                answers[i] = answer
        return answers

    def _batch(self, prompts: list[np.ndarray], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        import jax.numpy as jnp

        width = bucket(max(len(p) for p in prompts))
        tokens = np.zeros((self.batch_size, width), np.int32)
        start = np.zeros(self.batch_size, np.int32)
        active = np.zeros(self.batch_size, np.bool_)
        for row in range(self.batch_size):
            prompt = prompts[row] if row < len(prompts) else prompts[0]  # idle rows copy a real one
            tokens[row, width - len(prompt):] = prompt
            start[row], active[row] = width - len(prompt), row < len(prompts)
        out = self._loop(self.params, jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(active),
                         jnp.asarray(np.asarray(stop_ids, np.int32).reshape(-1)), jnp.int32(max_new_tokens),
                         new_bucket=new_token_bucket(max_new_tokens))
        out = np.asarray(out)
        return [[int(t) for t in out[row] if t >= 0] for row in range(len(prompts))]


def _greedy_loop(apply, config, dtype, params, tokens, start, active, stop_ids, max_new, new_bucket):
    """tokens [B, T] left-padded, start [B], active [B] -> new ids [B, N], -1 after a row stopped."""
    import jax
    import jax.numpy as jnp

    from jora_model.model.llama import empty_cache

    b, t = tokens.shape
    cache = empty_cache(config, b, t + new_bucket, dtype)
    logits, cache = apply(params, None, tokens, cache, jnp.int32(0), start, last_only=True)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((b, new_bucket), -1, jnp.int32)

    def unfinished(state):
        i, _, _, done, _ = state
        return (i < max_new) & ~jnp.all(done)

    def step(state):
        i, token, cache, done, out = state
        done = done | jnp.isin(token, stop_ids)
        out = out.at[:, i].set(jnp.where(done, -1, token))
        logits, cache = apply(params, None, token[:, None], cache, t + i, start)
        return i + 1, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache, done, out

    *_, out = jax.lax.while_loop(unfinished, step, (jnp.int32(0), first, cache, ~active, out))
    return out
