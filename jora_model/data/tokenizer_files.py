"""Facts about tokenizer files that the store and the stages need (no tokenizing here)."""

from __future__ import annotations

import json
from pathlib import Path

from jora_model.errors import JoraError


def tokenizer_vocab_size(path: Path) -> int:
    """Number of ids a SentencePiece `tokenizer.model` or an HF `tokenizer.json` can produce."""
    path = Path(path)
    if not path.is_file():
        raise JoraError("tokenizer file not found", path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab = data["model"]["vocab"]
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
            ids += [t["id"] for t in data.get("added_tokens", [])]
            return max(ids) + 1
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise JoraError("not a readable tokenizer.json", path) from None
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError):
        raise JoraError("not a SentencePiece model (corrupt or wrong file)", path) from None
    return processor.GetPieceSize()
