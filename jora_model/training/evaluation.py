"""Evaluation on the val/ split: the mean token loss of the adapter as it stands after a step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jora_model.data.shards import BatchReader, BatchSettings
from jora_model.training.batches import stack_batches
from jora_model.training.hooks import StepEnd
from jora_model.training.settings import TrainSettings


def evaluate(fns: Any, lora: Any, frozen: Any, mesh: Any, val_dir: Path, settings: TrainSettings) -> dict[str, float]:
    from jora_model.parallel import distributed, sharding

    eval_bs = settings.eval_batch_size or settings.batch_size
    eval_sharding = sharding.batch_sharding_2d(mesh)
    rows_here = distributed.local_rows(eval_sharding, (eval_bs, 1))
    val = BatchReader(val_dir, BatchSettings(batch_size=eval_bs, shuffle=False, drop_last=False,
                                             pad_multiple=settings.pad_multiple), rows=rows_here)
    want = rows_here.stop - rows_here.start
    nll = tokens = 0.0
    for i, batch in zip(range(val.batches_per_epoch), val):
        arrays = stack_batches([batch])
        rows = arrays["input_ids"].shape[1]
        if rows < want:  # last short batch: empty rows (segment 0, no targets) keep the shape
            arrays = {k: np.pad(v, ((0, 0), (0, want - rows), (0, 0))) for k, v in arrays.items()}
        length = arrays["input_ids"].shape[2]
        placed = {k: distributed.global_batch(v[0], eval_sharding, (eval_bs, length)) for k, v in arrays.items()}
        s, n = fns.eval_step(lora, frozen, placed)
        nll, tokens = nll + float(s), tokens + float(n)
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": tokens}


class Evaluation:
    """The hook: adds eval_loss, eval_perplexity and eval_tokens to the step's record."""

    def __init__(self, fns: Any, frozen: Any, mesh: Any, val_dir: Path, settings: TrainSettings):
        self._args = (fns, frozen, mesh, val_dir, settings)

    def __call__(self, event: StepEnd) -> dict[str, float]:
        from jora_model.parallel import distributed

        fns, frozen, mesh, val_dir, settings = self._args
        with distributed.collective(f"evaluating at step {event.step}"):
            return evaluate(fns, event.state.lora, frozen, mesh, val_dir, settings)
