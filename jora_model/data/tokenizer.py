"""The SentencePiece tokenizer as the data pipeline uses it: plain text in, ids out; and `load_tokenizer`,
which opens any of the three kinds of tokenizer file (the others live in tiktoken_file and hf_tokenizer).

Special tokens are never parsed out of text: SentencePiece encodes a literal "</s>" as ordinary pieces,
so a record that mentions "</s>" cannot end an example early. bos/eos are added by id only.

Encoding is cached per word. SentencePiece's BPE merges the best-scoring adjacent pair anywhere in the
string, so a merge can only cross a word boundary if some piece spans one. For Llama-style models (BPE,
identity normalisation, spaces kept as they are, no piece with "▁" after another character) none does:
the ids of a text are the ids of its words, each a run of spaces plus the characters up to the next
space, encoded on their own. Text is mostly repeated words, so most words are dictionary hits and
SentencePiece runs only on new ones. Models where the argument does not hold are encoded whole; the
tests compare both paths on text made to break them.
"""

from __future__ import annotations

import json
import re
from itertools import filterfalse
from pathlib import Path

import numpy as np

from jora_model.errors import JoraError

# A word: the spaces before it and everything up to the next space; or trailing spaces. "▁" (U+2581) is
# what SentencePiece turns spaces into, so a literal one in the text acts as a space too.
_WORDS = re.compile("[ \u2581]*[^ \u2581]+|[ \u2581]+")
_CACHE_LIMIT = 1 << 18  # words kept per process, so the cache's memory stays bounded; cleared when full


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
    return path


def load_tokenizer(path: str | Path):
    """The tokenizer in `path` (a file, or a parameter store naming one), whichever of the three kinds its
    content shows: SentencePiece (`Tokenizer`), Meta's tiktoken ranks file or an HF tokenizer.json. Each
    has encode/encode_array/encode_batch, decode, cut_point, piece, special_id, bos_id, eos_id,
    end_ids (every token that ends generation, eos first), vocab_size and word_cached; none parses special
    tokens out of text."""
    from jora_model.data.tokenizer_files import HF_JSON, TIKTOKEN, tokenizer_kind

    path = resolve_tokenizer(path)
    kind = tokenizer_kind(path)
    if kind == TIKTOKEN:
        from jora_model.data.tiktoken_file import TiktokenTokenizer

        return TiktokenTokenizer(path)
    if kind == HF_JSON:
        from jora_model.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    return Tokenizer(path)


class Tokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece

        from jora_model.data.tokenizer_files import NOT_A_TOKENIZER, SENTENCEPIECE, tokenizer_kind

        self.path = resolve_tokenizer(path)
        kind = tokenizer_kind(self.path)
        if kind != SENTENCEPIECE:
            raise JoraError(f"a SentencePiece model is needed here, not a {kind} file (use load_tokenizer)",
                            self.path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            model = self.path.read_bytes()  # read once: the word encoder below parses the same bytes
            self._sp.LoadFromSerializedProto(model)
        except (OSError, RuntimeError):
            raise JoraError(NOT_A_TOKENIZER, self.path) from None
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise JoraError("SentencePiece model has no bos or eos piece", self.path)
        self.end_ids = (self.eos_id,)
        self.vocab_size = self._sp.GetPieceSize()
        self._words, self._dummy_prefix = _word_encoder(model)
        self._exact: dict[str, bytes] = {}  # word (its leading spaces included) -> int32 ids
        self._spaced: dict[str, bytes] = {}  # word without spaces -> int32 ids of " " + word

    @property
    def word_cached(self) -> bool:
        """Whether encoding takes the per-word path (see the module docstring)."""
        return self._words is not None

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without bos/eos."""
        if self._words is None or not text:
            return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)
        if len(self._exact) + len(self._spaced) > _CACHE_LIMIT:
            self._exact.clear()
            self._spaced.clear()
        if (self._dummy_prefix and text[0] != " " and text[-1] != " " and "  " not in text
                and "\u2581" not in text):
            # The usual text: single spaces between words, so str.split finds the words, and with the
            # dummy prefix every word, the first too, is encoded as " " + word.
            cache, words, prefix = self._spaced, text.split(" "), " "
        else:
            cache, words, prefix = self._exact, _WORDS.findall(text), ""
            if self._dummy_prefix:
                words[0] = " " + words[0]  # the space SentencePiece puts before the text
        try:
            joined = b"".join(map(cache.__getitem__, words))
        except KeyError:
            encode = self._words.EncodeAsIds
            for word in filterfalse(cache.__contains__, set(words)):
                cache[word] = np.asarray(encode(prefix + word), dtype=np.int32).tobytes()
            joined = b"".join(map(cache.__getitem__, words))
        return np.frombuffer(joined, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

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

    def special_id(self, token: str) -> int | None:
        """The id of `token` when the model has it as a control piece (as bos and eos are), else None."""
        token_id = self._sp.PieceToId(token)
        return token_id if self._sp.IsControl(token_id) and self._sp.IdToPiece(token_id) == token else None


def _word_encoder(serialized: bytes):
    """A SentencePiece processor for single words (no dummy prefix) and whether the model adds one, when
    encoding word by word gives the model's own ids; (None, False) when it might not."""
    import sentencepiece

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: whole-text encoding is still exact
        return None, False
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(serialized)
    normalizer, trainer = model.normalizer_spec, model.trainer_spec
    bpe = trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    plain_spaces = (normalizer.name == "identity" and not normalizer.precompiled_charsmap
                    and not normalizer.remove_extra_whitespaces and normalizer.escape_whitespaces
                    and not trainer.treat_whitespace_as_suffix)
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    within_words = all("\u2581" not in p.piece.lstrip("\u2581") and p.type != user_defined for p in model.pieces)
    if not (bpe and plain_spaces and within_words):
        return None, False
    dummy_prefix = normalizer.add_dummy_prefix
    normalizer.add_dummy_prefix = False
    words = sentencepiece.SentencePieceProcessor()
    words.LoadFromSerializedProto(model.SerializeToString())
    return words, dummy_prefix
