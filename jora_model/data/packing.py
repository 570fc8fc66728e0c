"""Packing several short examples into rows of at most max_len tokens.

Best fit over a window of open rows: each example goes into the open row it fills most tightly;
when more than `window` rows are open, the fullest is emitted. Streaming and deterministic, and close
to first-fit-decreasing utilisation on typical length mixes without holding the data set in memory.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from jora_model.data.shards import Row


class _Open:
    def __init__(self):
        self.parts: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.length = 0


def pack(examples: Iterable[tuple[int, np.ndarray, np.ndarray]], max_len: int, window: int = 64) -> Iterator[Row]:
    """examples: (example_id, input_ids, loss_mask) each at most max_len long -> packed rows."""
    open_rows: list[_Open] = []
    for example_id, ids, mask in examples:
        n = len(ids)
        best = None
        for candidate in open_rows:
            room = max_len - candidate.length
            if room >= n and (best is None or room < max_len - best.length):
                best = candidate
        if best is None:
            best = _Open()
            open_rows.append(best)
        best.parts.append((example_id, ids, mask))
        best.length += n
        if len(open_rows) > window:
            fullest = max(open_rows, key=lambda r: r.length)
            open_rows.remove(fullest)
            yield _emit(fullest)
    for row in open_rows:
        yield _emit(row)


def _emit(row: _Open) -> Row:
    return Row(
        example_ids=[p[0] for p in row.parts],
        input_ids=np.concatenate([p[1] for p in row.parts]).astype(np.int32),
        loss_mask=np.concatenate([p[2] for p in row.parts]),
        segment_ids=np.concatenate([np.full(len(p[1]), i + 1, np.int32) for i, p in enumerate(row.parts)]),
    )
