"""Shared fixtures: a tiny SentencePiece tokenizer and tiny random checkpoints, all made here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.oracles.checkpoints import train_tokenizer

VOCAB = 320


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=VOCAB)
