"""From shards to the devices: checking token ids, stacking micro-batches, and feeding the loop one
optimizer step's batch at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jora_model.data.shards import Batch, BatchReader, ReaderPosition
from jora_model.errors import JoraError


def check_token_ids(directory: Path, vocab_size: int) -> None:
    """Data tokenized for another vocabulary would index past the embedding (JAX clamps silently)."""
    from jora_model.data.shards import ShardSet

    largest, where = ShardSet(directory).max_token_id()
    if largest >= vocab_size:
        raise JoraError(f"token id {largest} is outside the model's vocabulary of {vocab_size}: "
                        "the data was tokenized with another model's tokenizer", where)


def stack_batches(batches: list[Batch], length: int | None = None) -> dict[str, np.ndarray]:
    """[A, B, T] arrays from A micro-batches, padded to a common T."""
    t = length or max(b.input_ids.shape[1] for b in batches)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, t - a.shape[1])))

    return {"input_ids": np.stack([pad(b.input_ids) for b in batches]),
            "loss_mask": np.stack([pad(b.loss_mask) for b in batches]),
            "segment_ids": np.stack([pad(b.segment_ids) for b in batches])}


@dataclasses.dataclass(frozen=True)
class Fed:
    """One optimizer step's batch, already on its way to the devices."""
    arrays: dict[str, Any]  # global [A, B, T] arrays
    tokens: int  # real tokens in the whole global batch, other processes' rows too
    position: ReaderPosition  # where the reader stands after this batch: what a checkpoint of the step keeps


class Feeder:
    """Draws `grad_accum` micro-batches per step from the reader and places them on the mesh."""

    def __init__(self, reader: BatchReader, grad_accum: int, batch_size: int, sharding: Any):
        self._reader = reader
        self._iterator = iter(reader)
        self._grad_accum = grad_accum
        self._batch_size = batch_size
        self._sharding = sharding

    def __call__(self, step: int) -> Fed:
        from jora_model.parallel import distributed

        micro = [next(self._iterator) for _ in range(self._grad_accum)]
        arrays = stack_batches(micro)
        global_shape = (self._grad_accum, self._batch_size, arrays["input_ids"].shape[2])
        with distributed.collective(f"training step {step}"):
            placed = {k: distributed.global_batch(v, self._sharding, global_shape) for k, v in arrays.items()}
        return Fed(placed, sum(b.tokens for b in micro), self._reader.position)
