"""The batch reader: padding, seeded shuffling by epoch, and exact mid-epoch resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jora_model.data.shards import BatchReader, BatchSettings, ReaderPosition, Row, ShardWriter
from jora_model.errors import JoraError


@pytest.fixture
def split_dir(tmp_path):
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path / "train", rows_per_file=7, rows_per_batch=3)  # several small files
    for i in range(30):
        n = int(rng.integers(5, 300))
        mask = np.zeros(n, bool)
        mask[n // 2:] = True
        writer.add(Row([i], np.arange(n, dtype=np.int32) + i, mask, np.ones(n, np.int32)))
    assert len(writer.close()) == 5
    return tmp_path / "train"


def _ids(batch):
    return [ids[0] for ids in batch.example_ids]


def test_padding_to_multiples_of_128_and_fixed_length(split_dir):
    reader = BatchReader(split_dir, BatchSettings(batch_size=4, seed=1))
    for batch in itertools.islice(reader, 7):
        lengths = (batch.segment_ids > 0).sum(axis=1)
        assert batch.input_ids.shape[1] % 128 == 0 and batch.input_ids.shape[1] - lengths.max() < 128
        for row, n in enumerate(lengths):
            assert not batch.loss_mask[row, n:].any() and (batch.segment_ids[row, n:] == 0).all()
            assert (batch.input_ids[row, :n] == np.arange(n) + _ids(batch)[row]).all()
    fixed = BatchReader(split_dir, BatchSettings(batch_size=2, fixed_length=320))
    assert next(iter(fixed)).input_ids.shape == (2, 320)
    with pytest.raises(JoraError, match="more than the fixed length"):
        BatchReader(split_dir, BatchSettings(batch_size=2, fixed_length=100))


def test_each_epoch_is_a_seeded_permutation(split_dir):
    settings = BatchSettings(batch_size=5, seed=3)
    reader = BatchReader(split_dir, settings)
    epochs = [[i for b in itertools.islice(iter(reader), 6) for i in _ids(b)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
    assert epochs[0] != epochs[1]
    again = BatchReader(split_dir, settings)
    assert [i for b in itertools.islice(iter(again), 6) for i in _ids(b)] == epochs[0]
    other_seed = BatchReader(split_dir, BatchSettings(batch_size=5, seed=4))
    assert [i for b in itertools.islice(iter(other_seed), 6) for i in _ids(b)] != epochs[0]


def test_resume_mid_epoch_is_exact(split_dir):
    settings = BatchSettings(batch_size=4, seed=9)
    uninterrupted = [_ids(b) for b in itertools.islice(BatchReader(split_dir, settings), 20)]
    first = BatchReader(split_dir, settings)
    seen = [_ids(b) for b in itertools.islice(first, 9)]
    saved = first.position
    assert saved == ReaderPosition(epoch=1, batch=2)  # 7 batches per epoch with drop_last
    resumed = BatchReader(split_dir, settings, position=ReaderPosition(**vars(saved)))
    seen += [_ids(b) for b in itertools.islice(resumed, 11)]
    assert seen == uninterrupted


def test_empty_or_too_small_split(tmp_path, split_dir):
    (tmp_path / "none").mkdir()
    with pytest.raises(JoraError, match="no part"):
        BatchReader(tmp_path / "none")
    with pytest.raises(JoraError, match="cannot fill one batch"):
        BatchReader(split_dir, BatchSettings(batch_size=31))
