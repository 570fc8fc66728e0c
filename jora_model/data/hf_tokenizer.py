"""An HF `tokenizer.json` (the `tokenizers` library), as HF Llama 3 directories ship it.

Special tokens are never parsed out of text (`encode_special_tokens`): a record that mentions
"<|eot_id|>" is encoded as the characters it is made of. The file's post-processor (which would add
bos) is skipped; bos/eos are added by id only, as for the other tokenizers.

bos and eos: `tokenizer_config.json` beside the file when it names them (an instruct model's eos there
is "<|eot_id|>"), else the Llama added tokens ("<|begin_of_text|>"/"<|end_of_text|>", or "<s>"/"</s>").
No per-word cache: nothing here shows the pre-tokenizer splits at spaces, so it could not be proved exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jora_model.errors import JoraError

# Tokens that end generation when the vocabulary has them (Llama 3's text, turn and tool-call ends; Llama 2's).
_END_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>")
_FALLBACK = {"bos_token": ("<|begin_of_text|>", "<s>"), "eos_token": ("<|end_of_text|>", "</s>")}


def config_file(path: Path) -> Path | None:
    """The `tokenizer_config.json` beside a tokenizer.json, when there is one (it can decide bos/eos)."""
    config = Path(path).with_name("tokenizer_config.json")
    return config if config.is_file() else None


def _configured_tokens(path: Path) -> dict[str, str]:
    config = config_file(path)
    if config is None:
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise JoraError("not a readable tokenizer_config.json", config) from None
    out = {}
    for key in _FALLBACK:
        value = data.get(key) if isinstance(data, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            out[key] = value
    return out


class HFTokenizer:
    word_cached = False  # see the module docstring

    def __init__(self, path: str | Path):
        import tokenizers

        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises a bare Exception for any bad file
            raise JoraError(f"not a readable tokenizer.json ({str(exc).splitlines()[0][:120]})", self.path) from None
        self._tok.encode_special_tokens = True
        self.bos_id, self.eos_id = self._token_id("bos_token"), self._token_id("eos_token")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ends = [self._tok.token_to_id(token) for token in _END_TOKENS]
        self.end_ids = tuple(dict.fromkeys([self.eos_id] + [i for i in ends if i is not None]))

    def _token_id(self, key: str) -> int:
        configured = _configured_tokens(self.path).get(key)
        for token in (configured,) if configured else _FALLBACK[key]:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        name = key.removesuffix("_token")
        raise JoraError(f"tokenizer.json has no {name} token "
                        f"({configured or ' or '.join(_FALLBACK[key])}); give its tokenizer_config.json", self.path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without bos/eos."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def cut_point(self, text: str, keep_tokens: int) -> int:
        """Length in characters of a prefix of `text` made of at most its first `keep_tokens` tokens: it
        ends where token `keep_tokens` starts, so a character spread over tokens is left out whole."""
        if keep_tokens <= 0:
            return 0
        offsets = self._tok.encode(text, add_special_tokens=False).offsets
        return len(text) if keep_tokens >= len(offsets) else offsets[keep_tokens][0]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are left out, as SentencePiece leaves out bos and eos."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def added_tokens(self) -> dict[str, int]:
        """Spelling -> id of the file's added tokens: the ones transformers splits a rendered chat
        template on before encoding the text between them."""
        return {token.content: token_id for token_id, token in self._tok.get_added_tokens_decoder().items()}

    def special_id(self, token: str) -> int | None:
        """The id of the added token spelled `token`, else None."""
        return self.added_tokens().get(token)
