"""Train a small SentencePiece tokenizer with Llama's conventions (for the demo's random model)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

from jora_model.errors import JoraError


def train_llama_tokenizer(texts: Iterable[str], out_path: Path, vocab_size: int) -> Path:
    """BPE with byte fallback, unk/bos/eos = 0/1/2, identity normalisation, whitespace kept as is:
    the settings of Llama's tokenizer.model. The vocabulary may come out smaller than asked when the
    text is too short for that many pieces (the model is then sized to the tokenizer)."""
    import sentencepiece

    corpus = "\n".join(line for text in texts for line in text.splitlines() if line.strip())
    if not corpus:
        raise JoraError("no text to train a tokenizer on")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
        max_sentence_length=1 << 16)
    out_path = Path(out_path)
    out_path.write_bytes(model.getvalue())
    return out_path
