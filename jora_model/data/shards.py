"""Tokenized examples on disk (Arrow IPC shards) and the batch reader that streams them to training.

A split directory holds `part-00000.arrow`, ... Each row is one example, or with packing several,
told apart by `segment_ids` (1, 2, ...). Columns:
    example_id   int64           index of the (first) record in the source file
    example_ids  list<int64>     every record in the row (one unless packed)
    input_ids    list<int32>     [bos] prompt response [eos] ...
    loss_mask    list<int8>      1 where the token is a training target (response and eos)
    segment_ids  list<int32>     1 for every token unless packed
    length       int32           tokens in the row
Training predicts token t+1 from tokens <= t: the loss at position t uses loss_mask[t + 1].

The schema's metadata names the prompt template the rows were made with (`jora.template`, `jora.system`,
`jora.chat_template`; see jora_model.data.templates; shards without them were made with plain alpaca) and
the SHA-256 of the tokenizer file that made the ids (`jora.tokenizer_sha256`; absent in older shards).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from jora_model.errors import JoraError

TOKENIZER_KEY = "jora.tokenizer_sha256"  # which tokenizer made the ids: ShardSet.tokenizer_sha256()

SCHEMA = pa.schema([
    ("example_id", pa.int64()),
    ("example_ids", pa.list_(pa.int64())),
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("segment_ids", pa.list_(pa.int32())),
    ("length", pa.int32()),
])


@dataclasses.dataclass
class Row:
    example_ids: list[int]
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool or int8 [T]
    segment_ids: np.ndarray  # int32 [T]


class ShardWriter:
    """Appends rows to `part-NNNNN.arrow` files of at most `rows_per_file` rows, in record batches;
    `metadata` (str -> str) goes into every file's schema."""

    def __init__(self, directory: Path, rows_per_file: int = 20000, rows_per_batch: int = 1000,
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.schema = SCHEMA.with_metadata(metadata) if metadata else SCHEMA
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows_per_file, self.rows_per_batch = rows_per_file, rows_per_batch
        self._pending: list[Row] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._sink = None
        self._rows_in_file = 0
        self.files: list[Path] = []
        self.rows = 0

    def add(self, row: Row) -> None:
        self._pending.append(row)
        self.rows += 1
        if len(self._pending) >= self.rows_per_batch:
            self._flush()

    def _flush(self) -> None:
        while self._pending:
            if self._writer is None:
                path = self.directory / f"part-{len(self.files):05d}.arrow"
                self._sink = pa.OSFile(str(path), "wb")
                self._writer = pa.ipc.new_file(self._sink, self.schema)
                self.files.append(path)
                self._rows_in_file = 0
            take = min(len(self._pending), self.rows_per_file - self._rows_in_file)
            rows, self._pending = self._pending[:take], self._pending[take:]
            self._writer.write_batch(_to_batch(rows, self.schema))
            self._rows_in_file += take
            if self._rows_in_file >= self.rows_per_file:
                self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def close(self) -> list[Path]:
        self._flush()
        self._close_file()
        return self.files


def _to_batch(rows: list[Row], schema: pa.Schema = SCHEMA) -> pa.RecordBatch:
    def lists(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))

    return pa.RecordBatch.from_arrays([
        pa.array([r.example_ids[0] for r in rows], pa.int64()),
        lists([np.asarray(r.example_ids, np.int64) for r in rows], pa.int64()),
        lists([np.asarray(r.input_ids, np.int32) for r in rows], pa.int32()),
        lists([np.asarray(r.loss_mask, np.int8) for r in rows], pa.int8()),
        lists([np.asarray(r.segment_ids, np.int32) for r in rows], pa.int32()),
        pa.array([len(r.input_ids) for r in rows], pa.int32()),
    ], schema=schema)


class ShardSet:
    """All rows of one split, memory-mapped: random access by global row number without reading the
    rest, so a million examples never have to sit in memory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = sorted(self.directory.glob("part-*.arrow"))
        if not self.files:
            raise JoraError("no part-*.arrow shards found", self.directory)
        self._tables: list[pa.Table] = []
        for path in self.files:
            try:
                table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
            except (pa.ArrowInvalid, OSError) as exc:
                raise JoraError(f"not a readable Arrow shard ({exc})", path) from None
            if not SCHEMA.equals(table.schema.remove_metadata()):
                raise JoraError("Arrow shard has the wrong columns (made by another tool?)", path)
            self._tables.append(table)
        self._starts = np.cumsum([0] + [t.num_rows for t in self._tables])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def metadata(self) -> dict[str, str]:
        """The first shard's schema metadata (str -> str) about the prompt template, when not plain alpaca
        (the tokenizer's hash is apart, in tokenizer_sha256)."""
        return {key: value for key, value in self._raw_metadata().items() if key != TOKENIZER_KEY}

    def tokenizer_sha256(self) -> str | None:
        """The SHA-256 of the tokenizer file the ids were made with; None in shards older than the record."""
        return self._raw_metadata().get(TOKENIZER_KEY)

    def _raw_metadata(self) -> dict[str, str]:
        raw = self._tables[0].schema.metadata or {}
        return {key.decode(): value.decode() for key, value in raw.items()}

    def max_token_id(self) -> tuple[int, Path | None]:
        """The largest token id in the split and the file holding it."""
        import pyarrow.compute as pc

        best, where = -1, None
        for path, table in zip(self.files, self._tables):
            values = pc.list_flatten(table.column("input_ids"))
            if len(values) and pc.max(values).as_py() > best:
                best, where = pc.max(values).as_py(), path
        return best, where

    def lengths(self) -> np.ndarray:
        return np.concatenate([t.column("length").to_numpy() for t in self._tables]).astype(np.int64)

    def row(self, index: int) -> Row:
        if not 0 <= index < len(self):
            raise IndexError(index)
        f = int(np.searchsorted(self._starts, index, side="right") - 1)
        table, r = self._tables[f], index - int(self._starts[f])

        def cell(name: str, dtype) -> np.ndarray:
            return table.column(name)[r].values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)

        return Row(cell("example_ids", np.int64).tolist(), cell("input_ids", np.int32),
                   cell("loss_mask", np.bool_), cell("segment_ids", np.int32))


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    batch_size: int = 1  # rows per batch
    seed: int = 420  # shuffling seed; epoch e uses the permutation drawn from (seed, e)
    pad_multiple: int = 128  # pad each batch to its longest row rounded up to this (fewer recompiles)
    fixed_length: int | None = None  # pad every batch to exactly this length instead
    pad_id: int = 0  # token id written into padding (masked out of attention and loss)
    drop_last: bool = True  # a short final batch would be a new shape to compile
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # int32 [B, T]
    loss_mask: np.ndarray  # bool [B, T]: token t is a target
    segment_ids: np.ndarray  # int32 [B, T]: 0 on padding
    example_ids: list[list[int]]  # records in each row
    tokens: int = 0  # real tokens in the whole batch, the rows other processes read included


@dataclasses.dataclass(frozen=True)
class ReaderPosition:
    """Where a reader stands: saved in a checkpoint, it resumes mid-epoch at the next batch."""
    epoch: int = 0
    batch: int = 0  # batches of this epoch already handed out


class BatchReader:
    """Batches of `batch_size` rows in a seeded order. With `rows`, only those rows of each batch are
    read and returned (the share of one process in a multi-host run); the padded length still comes
    from the whole batch, so every process pads to the same length."""

    def __init__(self, directory: str | Path, settings: BatchSettings = BatchSettings(),
                 position: ReaderPosition = ReaderPosition(), rows: slice | None = None):
        if settings.batch_size <= 0:
            raise JoraError(f"batch size must be positive, got {settings.batch_size}")
        self.shards = ShardSet(directory)
        self.settings = settings
        self.position = position
        self.rows = rows if rows is not None else slice(0, settings.batch_size)
        self._lengths = self.shards.lengths()  # one column: the whole batch's lengths without its tokens
        if self.batches_per_epoch == 0:
            raise JoraError(f"{len(self.shards)} rows cannot fill one batch of {settings.batch_size}", directory)
        if settings.fixed_length is not None:
            longest = int(self.shards.lengths().max())
            if longest > settings.fixed_length:
                raise JoraError(f"a row has {longest} tokens, more than the fixed length {settings.fixed_length}",
                                directory)

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.shards), self.settings.batch_size
        return n // b if self.settings.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.shards)
        if not self.settings.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.settings.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position on, forever (epoch after epoch); `position` advances."""
        while True:
            epoch, start = self.position.epoch, self.position.batch
            order = self.order(epoch)
            b = self.settings.batch_size
            for i in range(start, self.batches_per_epoch):
                indices = order[i * b:(i + 1) * b]
                self.position = ReaderPosition(epoch, i + 1)
                yield self._collate(indices)
            self.position = ReaderPosition(epoch + 1, 0)

    def _collate(self, indices: np.ndarray) -> Batch:
        s = self.settings
        lengths = self._lengths[indices]
        length = s.fixed_length or -(-int(lengths.max()) // s.pad_multiple) * s.pad_multiple
        rows = [self.shards.row(int(j)) for j in indices[self.rows]]
        ids = np.full((len(rows), length), s.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.bool_)
        seg = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n], mask[i, :n], seg[i, :n] = r.input_ids, r.loss_mask, r.segment_ids
        return Batch(ids, mask, seg, [r.example_ids for r in rows], int(lengths.sum()))
