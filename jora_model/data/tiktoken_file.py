"""Meta's Llama 3 tokenizer: a tiktoken ranks file (`tokenizer.model`) with Meta's split pattern and the
256 special tokens Meta's llama-models code adds after the ranks.

Special tokens are never parsed out of text (`encode_ordinary`): a record that mentions "<|eot_id|>" is
encoded as the characters it is made of, so it cannot end a turn or an example early. bos/eos are added
by id only.

No per-word cache: tiktoken runs BPE on each regex piece independently, so a per-piece cache would be
exact, but its encoder is native code already and the split that a cache needs would run in Python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jora_model.data.tokenizer_files import TIKTOKEN_SPECIALS, read_tiktoken_ranks
from jora_model.errors import JoraError

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Every token that ends generation: the text, a chat turn, or a turn that awaits a tool's answer.
END_TOKENS = (EOS, "<|eot_id|>", "<|eom_id|>")


def special_tokens() -> list[str]:
    """Meta's 256 special tokens in id order (the first follows the last rank)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(TIKTOKEN_SPECIALS - len(_NAMED_SPECIALS))]
    return _NAMED_SPECIALS + reserved


def build_encoding(ranks: dict[bytes, int], name: str = "llama3"):
    import tiktoken

    specials = {token: len(ranks) + i for i, token in enumerate(special_tokens())}
    return tiktoken.Encoding(name=name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)


class TiktokenTokenizer:
    word_cached = False  # see the module docstring

    def __init__(self, path: str | Path):
        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        try:
            self._enc = build_encoding(ranks)
        except ValueError as exc:
            raise JoraError(f"tiktoken rejects the ranks file: {exc}", self.path) from None
        self._n_ranks = len(ranks)
        self.bos_id = self._enc.encode_single_token(BOS)
        self.eos_id = self._enc.encode_single_token(EOS)
        self.end_ids = tuple(self._enc.encode_single_token(token) for token in END_TOKENS)
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without bos/eos."""
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def cut_point(self, text: str, keep_tokens: int) -> int:
        """Length in characters of the longest prefix of `text` made of its first `keep_tokens` tokens,
        never splitting a character (a character spelled by several byte tokens is left out whole)."""
        if keep_tokens <= 0:
            return 0
        ids = self._enc.encode_ordinary(text)[:keep_tokens]
        # The tokens' bytes are a prefix of the text's UTF-8; only a last character cut short fails to decode.
        return len(self._enc.decode_bytes(ids).decode("utf-8", errors="ignore"))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are left out, as SentencePiece leaves out bos and eos."""
        return self._enc.decode([int(i) for i in ids if int(i) < self._n_ranks])

    def piece(self, token_id: int) -> str:
        return self._enc.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")

    def special_id(self, token: str) -> int | None:
        """The id of the special token spelled `token`, else None."""
        return self._enc.encode_single_token(token) if token in self._enc.special_tokens_set else None
