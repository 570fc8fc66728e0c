"""The SentencePiece tokenizer as the data pipeline uses it: plain text in, ids out.

Special tokens are never parsed out of text: SentencePiece encodes a literal "</s>" as ordinary pieces,
so a record that mentions "</s>" cannot end an example early. bos/eos are added by id only.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import JoraError


def resolve_tokenizer(path: str | Path) -> Path:
    """A tokenizer.model, or a parameter store directory whose store.json names one."""
    path = Path(path)
    if path.is_dir():
        index = path / "store.json"
        if not index.is_file():
            raise JoraError("directory is not a jora parameter store (no store.json)", path)
        try:
            name = json.loads(index.read_text()).get("tokenizer")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JoraError("corrupt store index (not JSON)", index) from None
        if not name:
            raise JoraError("parameter store has no tokenizer (convert it with --tokenizer)", path)
        path = path / name
    if not path.is_file():
        raise JoraError("tokenizer file not found", path)
    if path.suffix == ".json":
        raise JoraError("a SentencePiece tokenizer.model is needed, not tokenizer.json", path)
    return path


class Tokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = resolve_tokenizer(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError):
            raise JoraError("not a SentencePiece model (corrupt or wrong file)", self.path) from None
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise JoraError("SentencePiece model has no bos or eos piece", self.path)
        self.vocab_size = self._sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.EncodeAsIds(texts)

    def cut_point(self, text: str, keep_tokens: int) -> int:
        """Length in characters of the longest prefix of `text` made of its first `keep_tokens` pieces
        (never splitting a character, even one spelled with several byte pieces)."""
        if keep_tokens <= 0:
            return 0
        offsets = self._sp.EncodeAsOffsetMapping(text)["offsets"]
        return offsets[min(keep_tokens, len(offsets)) - 1][1]

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    def piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))
