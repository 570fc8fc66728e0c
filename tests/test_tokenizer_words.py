"""The per-word encoding cache gives SentencePiece's own ids, and is refused for models where it would not.

The oracle is SentencePiece encoding the whole text. The texts are made to break a word splitter: runs of
spaces at the start, middle and end, a literal "▁", tabs and newlines, multi-byte and unknown characters
(byte fallback), digits (split one by one), and random mixes of all of these.
"""

from __future__ import annotations

import io
import random

import pytest
import sentencepiece

from jora_model.data.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.  Two  spaces   and three.",
    "    def main():\n        return 0\n",
    "Retrieval augmented generation: passages [1] and [2] say 42 and 3.14.",
    "café naïve résumé façade Zürich São Kraków Ångström – “quoted” … 日本 Москва λ Δ",
    "\tTabbed\tcolumns\tand trailing spaces   ",
    "indentation   matters  in  code  blocks  and  tables",
] * 40

EDGE = ["", " ", "  ", "   x", "x   ", " x ", "a  b", "a\u2581b", "\u2581", "\u2581\u2581a", " \u2581 a", "a \u2581",
        "\t", "\t x", "x\t ", "\n\n", " \n ", "</s> <s> ### Response:", "🙂 🙂🙂  🙂", "1234 56  7",
        "ünïcödé  wörds", "a" * 300, " ".join(["the"] * 200), "x" + " " * 50 + "y"]

ALPHABET = list("aeiou tnrs  \u2581\t\n.,1é日🙂") + ["the", " the", "ing", "  ", "Q"]


def _train(path, **overrides):
    settings = dict(vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                    pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
                    split_digits=True, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
                    minloglevel=2, allow_whitespace_only_pieces=True)
    settings.update(overrides)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.Train(sentence_iterator=iter(CORPUS), model_writer=model, **settings)
    path.write_bytes(model.getvalue())
    return path


def _texts(seed: int = 0, n: int = 2000) -> list[str]:
    rng = random.Random(seed)
    fuzz = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    return EDGE + CORPUS[:6] + fuzz


def _whole(path) -> sentencepiece.SentencePieceProcessor:
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(str(path))
    return sp


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    """Llama's settings, whitespace-only pieces ("▁▁", "▁▁▁▁") included."""
    return _train(tmp_path_factory.mktemp("words") / "llama_like.model")


def test_word_cache_matches_whole_text_encoding(llama_like):
    whole, tok = _whole(llama_like), Tokenizer(llama_like)
    pieces = [whole.IdToPiece(i) for i in range(whole.GetPieceSize())]
    assert tok.word_cached
    assert any(set(p) == {"\u2581"} and len(p) > 1 for p in pieces)  # the case the splitter must get right
    texts = _texts()
    for _ in range(2):  # cold, then every word a cache hit
        for text in texts:
            assert tok.encode(text) == whole.EncodeAsIds(text), repr(text)
    array = tok.encode_array("a  b c")
    assert array.dtype.name == "int32" and array.tolist() == whole.EncodeAsIds("a  b c")


def test_word_cache_without_dummy_prefix(tmp_path):
    path = _train(tmp_path / "no_prefix.model", add_dummy_prefix=False)
    whole, tok = _whole(path), Tokenizer(path)
    assert tok.word_cached
    for text in _texts(seed=1, n=500):
        assert tok.encode(text) == whole.EncodeAsIds(text), repr(text)


@pytest.mark.parametrize("overrides", [dict(split_by_whitespace=False), dict(remove_extra_whitespaces=True),
                                       dict(model_type="unigram"), dict(normalization_rule_name="nmt_nfkc"),
                                       dict(user_defined_symbols=["foo bar", "<ctx>"])])
def test_models_it_does_not_hold_for_are_encoded_whole(tmp_path, overrides):
    path = _train(tmp_path / "other.model", **({"vocab_size": 800} | overrides))
    whole, tok = _whole(path), Tokenizer(path)
    assert not tok.word_cached
    for text in _texts(seed=2, n=300):
        assert tok.encode(text) == whole.EncodeAsIds(text), repr(text)


def test_the_guard_is_needed_pieces_across_words_break_the_word_split(tmp_path):
    """With pieces that span a space, word-by-word encoding gives other ids; this is what the
    model check keeps out (else the test above could not fail)."""
    path = _train(tmp_path / "spanning.model", split_by_whitespace=False, vocab_size=800)
    whole = _whole(path)
    assert any("\u2581" in whole.IdToPiece(i).lstrip("\u2581") for i in range(whole.GetPieceSize()))
    words = sentencepiece.SentencePieceProcessor()
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    words.LoadFromSerializedProto(proto.SerializeToString())
    differs = 0
    for text in CORPUS[:6]:
        parts = text.split(" ")
        by_word = [i for k, part in enumerate(parts) for i in words.EncodeAsIds(" " + part)] if all(parts) else None
        differs += by_word is not None and by_word != whole.EncodeAsIds(text)
    assert differs > 0
