"""Facts about tokenizer files that the store and the stages need (no tokenizing here).

Three kinds of file, told apart by their content (the names lie: Meta's Llama 3 `tokenizer.model` is not
SentencePiece): a SentencePiece model (binary protobuf), Meta's tiktoken ranks file (text, one
`base64(token bytes) rank` per line) and an HF `tokenizer.json`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

from jora_model.errors import JoraError

SENTENCEPIECE, TIKTOKEN, HF_JSON = "sentencepiece", "tiktoken", "tokenizer.json"
# Meta's Llama 3 code adds this many special tokens after the ranks (ids len(ranks) .. len(ranks) + 255).
TIKTOKEN_SPECIALS = 256
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")


def tokenizer_kind(path: Path) -> str:
    """SENTENCEPIECE, TIKTOKEN or HF_JSON, from the first bytes of the file. Anything else is taken for
    SentencePiece, whose loader then rejects it with its own message."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise JoraError("tokenizer file not found", path) from None
    except IsADirectoryError:
        raise JoraError("tokenizer path is a directory, not a file", path) from None
    if head.lstrip().startswith(b"{"):
        return HF_JSON
    if _RANK_LINE.fullmatch(head.split(b"\n", 1)[0]):
        return TIKTOKEN
    return SENTENCEPIECE


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The token -> rank table of a tiktoken ranks file. Ranks must be 0 .. n-1 (Meta's file is), since
    the special tokens' ids are counted from n."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        raise JoraError("tokenizer file not readable", path) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not _RANK_LINE.fullmatch(line):
            raise JoraError(f"not a tiktoken ranks file: line {number} is not 'base64 rank'", path)
        token, rank = line.split()
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except binascii.Error:
            raise JoraError(f"not a tiktoken ranks file: bad base64 at line {number}", path) from None
    if not ranks:
        raise JoraError("empty tiktoken ranks file", path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise JoraError("tiktoken ranks file: ranks are not 0 .. n-1, each once (or a token repeats)", path)
    return ranks


def tokenizer_vocab_size(path: Path) -> int:
    """Number of ids a SentencePiece model, a tiktoken ranks file (its ranks plus Meta's 256 special
    tokens) or an HF `tokenizer.json` can produce."""
    path = Path(path)
    kind = tokenizer_kind(path)
    if kind == HF_JSON:
        return _json_vocab_size(path)
    if kind == TIKTOKEN:
        return len(read_tiktoken_ranks(path)) + TIKTOKEN_SPECIALS
    return _sentencepiece_processor(path).GetPieceSize()


def tokenizer_companions(path: Path) -> dict[str, Path]:
    """Files beside a tokenizer that decide how it is used and so travel with it into a store: an HF
    tokenizer.json's tokenizer_config.json names its bos and eos (an instruct model's eos is "<|eot_id|>";
    without the file it would fall back to "<|end_of_text|>"). Name in the store -> file."""
    path = Path(path)
    config = path.with_name("tokenizer_config.json")
    if tokenizer_kind(path) == HF_JSON and config.is_file() and config != path:
        return {config.name: config}
    return {}


def _json_vocab_size(path: Path) -> int:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens", [])]
        return max(ids) + 1
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise JoraError("not a readable tokenizer.json", path) from None


def _sentencepiece_processor(path: Path):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError):
        raise JoraError(NOT_A_TOKENIZER, path) from None
    return processor


NOT_A_TOKENIZER = "not a SentencePiece model nor a tiktoken ranks file (corrupt or wrong file)"
