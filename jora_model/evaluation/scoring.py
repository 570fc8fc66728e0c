"""The teacher-forced loss of each example's response: the NLL of its loss-masked tokens (the reply and
its end token) given everything before them, with the targets and weights training uses
(jora_model.training.loss.next_token_targets). Examples are sorted by length and scored `batch_size`
at a time, padded on the right to a bucket length (segment 0, which no target counts). Only the positions
that predict a response token go through the output head (the model's `select`): over a long prompt the
head is most of the work and none of the loss."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from jora_model.evaluation.greedy import bucket, new_token_bucket


class ResponseScorer:
    """Per-example (NLL summed over the response tokens, number of response tokens)."""

    def __init__(self, model: Any, batch_size: int = 8):
        import jax

        from jora_model.model.llama import ModelOptions, transformed

        self.params, self.batch_size = model.params, batch_size
        options = ModelOptions(compute_dtype=model.options.compute_dtype, lora=model.options.lora)
        self._score = jax.jit(functools.partial(_row_nll, transformed(model.config, options).apply))

    def score(self, examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, int]]:
        """examples: (input_ids [T], loss_mask [T] bool) each."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
        results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
        for first in range(0, len(order), self.batch_size):
            chosen = order[first:first + self.batch_size]
            sums, counts = self._batch([examples[i] for i in chosen])
            for row, i in enumerate(chosen):
                results[i] = (float(sums[row]), int(counts[row]))
        return results

    def _batch(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        import jax.numpy as jnp

        width = bucket(max(len(ids) for ids, _ in examples))
        # position t predicts token t + 1: the positions before a response token, per row
        predicting = [np.flatnonzero(mask[1:]) for _, mask in examples]
        picks = new_token_bucket(max(len(p) for p in predicting))
        ids = np.zeros((self.batch_size, width), np.int32)
        mask = np.zeros((self.batch_size, width), np.bool_)
        segments = np.zeros((self.batch_size, width), np.int32)
        select = np.zeros((self.batch_size, picks), np.int32)
        selected = np.zeros((self.batch_size, picks), np.bool_)
        for row, ((row_ids, row_mask), where) in enumerate(zip(examples, predicting)):
            n = len(row_ids)
            ids[row, :n], mask[row, :n], segments[row, :n] = row_ids, row_mask, 1
            select[row, :len(where)], selected[row, :len(where)] = where, True
        sums, counts = self._score(self.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments),
                                   jnp.asarray(select), jnp.asarray(selected))
        return np.asarray(sums), np.asarray(counts)


def _row_nll(apply, params, ids, mask, segments, select, selected):
    """(NLL summed over each row's targets [B], targets per row [B]); select [B, R] the positions that
    may predict a target, selected [B, R] which of them are real."""
    import jax
    import jax.numpy as jnp

    from jora_model.training.loss import next_token_targets

    logits = apply(params, None, ids, segments, select=select).astype(jnp.float32)  # [B, R, V]
    targets, weights = next_token_targets(ids, mask, segments)
    targets = jnp.take_along_axis(targets, select, axis=1)
    weights = jnp.take_along_axis(weights, select, axis=1) * selected
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (jax.nn.logsumexp(logits, axis=-1) - picked) * weights
    return nll.sum(axis=1), weights.sum(axis=1)
