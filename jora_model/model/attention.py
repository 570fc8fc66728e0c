"""Which keys each query sees: indices and segment ids, from which any backend builds its mask.

Shapes: [B, T] for the queries' side, [B, S] for the keys'. The attention itself is a backend kernel
(backends/: `Kernels.attention`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Visibility(NamedTuple):
    """Key s is visible to query t when k_index[s] <= q_index[t] and k_segment[s] == q_segment[t].
    All [B, T] or [B, S] int32."""
    q_index: jax.Array
    k_index: jax.Array
    q_segment: jax.Array
    k_segment: jax.Array

    @staticmethod
    def causal(segment_ids: jax.Array) -> "Visibility":
        """Self-attention over [B, T] tokens: each sees itself and earlier tokens of its segment."""
        index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
        return Visibility(index, index, segment_ids, segment_ids)

    def rows(self, start: int, stop: int) -> "Visibility":
        return self._replace(q_index=self.q_index[:, start:stop], q_segment=self.q_segment[:, start:stop])

    def keys(self, stop: int) -> "Visibility":
        return self._replace(k_index=self.k_index[:, :stop], k_segment=self.k_segment[:, :stop])

    def mask(self) -> jax.Array:  # [B, T, S] bool
        return ((self.k_index[:, None, :] <= self.q_index[:, :, None])
                & (self.k_segment[:, None, :] == self.q_segment[:, :, None]))
