"""Train a small tokenizer for the demo's random model: SentencePiece with Llama 2's conventions, or a
tiktoken ranks file in Llama 3's form."""

from __future__ import annotations

import base64
import io
import json
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


def train_tiktoken_ranks(texts: Iterable[str], out_path: Path, n_ranks: int, multiple: int = 1) -> Path:
    """A Llama 3 style tokenizer.model (Meta's tiktoken ranks file) for `texts`: byte-level BPE trained by
    the `tokenizers` library on the text split by Meta's pattern, written as ranks: the 256 single bytes
    (rank = byte), then each learned merge's token in the order the trainer learned it, so every token
    ranks after the two it is made of. At most `n_ranks` ranks, fewer when the text runs out of pairs;
    cut so that ranks + Meta's 256 special tokens is a multiple of `multiple` (the vocabulary-parallel
    embedding splits its rows evenly across shards). tiktoken, reading the file, is the tokenizer:
    the trainer only chooses the vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from jora_model.data.tiktoken_file import PATTERN
    from jora_model.data.tokenizer_files import TIKTOKEN_SPECIALS
    from jora_model.formats.hf_tokenizer_export import bytes_to_unicode

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise JoraError("no text to train a tokenizer on")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=n_ranks, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(bpe.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(bytes(byte_of[c] for c in left + right), len(ranks))
    keep = min(len(ranks), n_ranks)
    keep -= (keep + TIKTOKEN_SPECIALS) % multiple
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items() if rank < keep]
    out_path = Path(out_path)
    out_path.write_text("\n".join(lines) + "\n")
    return out_path
