"""Exporting a Llama 3 tokenizer as a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json), and
checking the export with transformers' AutoTokenizer against our own tokenizer.

Two sources (SentencePiece stays in hf_export.py):
- Meta's tiktoken ranks file becomes a byte-level BPE: every token's bytes spelled in GPT-2's
  byte-to-character alphabet (the `tokenizers` library's ByteLevel), Meta's split pattern run first, the
  ranks as ids, merges made from the ranks (below), and Meta's 256 special tokens as added tokens.
- An HF tokenizer.json is copied, with its tokenizer_config.json when the store kept one.
Both get a post-processor that puts bos first, so `AutoTokenizer(text)` gives [bos] + our ids, the way the
model saw every training example.

Merges from ranks: tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF's BPE the
pair listed first. Listing, for each token in rank order, every split of it into two tokens that exist
makes the same choices for a ranks file that BPE training wrote (each token joins two of lower rank;
transformers' TikTokenConverter lists them the same way), and `ignore_merges` returns a whole piece found
in the vocabulary at once, as tiktoken does. The check below confirms it on the exported directory.

Special tokens in text: AutoTokenizer matches "<|eot_id|>" written in text as the special token (chat
templates rely on that, and Meta's own HF release does it); ours never does. The export keeps
transformers' behaviour, so the check compares with `split_special_tokens=True` on every text, and in
transformers' default mode on the texts without special-token literals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jora_model.errors import JoraError

CHECK_TEXTS = [
    "Hello world", " leading space", "  two  spaces\tand a tab", "trailing spaces   ", "a\n\nb\r\n\r\nc",
    "héllo wörld € 搬送 🔋 e\u0301 \u0645\u0631\u062d\u0628\u0627", "digits 1234567 and 45 and 007 3.14159",
    "It's THEY'LL we'Ve I'm", "### Instruction:\nWrite the thing\n\n### Response:\nok",
    "literal <|eot_id|> and <|begin_of_text|><|end_of_text|> stay text", "<|start_header_id|>user<|end_header_id|>",
    "tabs\t\t\tand\n\n\n\nnewlines   \n  ", "x" * 40, "",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 are moved to 256+,
    so every byte string is a string of visible characters (what ByteLevel pre-tokenizes into)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_string(token: bytes, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in token)


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of every token into two tokens that exist, ordered by the rank of the
    token they make, then by the ranks of the two pieces (see the module docstring)."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def bos_post_processor(existing: dict | None, bos: str, bos_id: int) -> dict:
    """A post-processor that puts bos first; a ByteLevel step the file had (offsets only) is kept, and
    any template of the file's own (which might add eos, or nothing) is replaced."""
    steps = [] if existing is None else existing.get("processors", [existing])
    keep = [step for step in steps if step.get("type") == "ByteLevel"]
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    template = {"type": "TemplateProcessing", "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    return {"type": "Sequence", "processors": keep + [template]} if keep else template


def tiktoken_spec(path: Path) -> dict[str, Any]:
    """tokenizer.json (as a dict) for Meta's tiktoken ranks file in `path`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from jora_model.data import tiktoken_file
    from jora_model.data.tokenizer_files import read_tiktoken_ranks

    ranks = read_tiktoken_ranks(path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE spells any text in single bytes first; Meta's file has all 256
        raise JoraError(f"tiktoken ranks file lacks the single byte {missing[0]:#04x}: not byte-level BPE", path)
    alphabet = bytes_to_unicode()
    vocab = {token_string(token, alphabet): rank for token, rank in ranks.items()}
    merges = [(token_string(a, alphabet), token_string(b, alphabet)) for a, b in tiktoken_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tiktoken_file.PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = tiktoken_file.special_tokens()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    if tok.token_to_id(specials[0]) != len(ranks):  # the ids must follow the ranks, as in Meta's code
        raise JoraError("special token ids do not follow the ranks", path)
    spec = json.loads(tok.to_str())
    spec["post_processor"] = bos_post_processor(None, tiktoken_file.BOS, len(ranks))
    return spec


def tokenizer_config(base: dict, bos: str, eos: str) -> dict:
    """tokenizer_config.json: the source's own settings (a chat template, say) with bos/eos ours, bos
    added and eos not (as our training examples start), and the generic fast class, which takes the
    tokenizer.json as written rather than rebuilding it from a vocabulary."""
    return {**base, "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": base.get("model_max_length", 1_000_000)}


def export_llama3_tokenizer(path: Path, out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json for a tiktoken ranks file or an HF tokenizer.json."""
    from jora_model.data.hf_tokenizer import config_file
    from jora_model.data.tokenizer import load_tokenizer
    from jora_model.data.tokenizer_files import TIKTOKEN, tokenizer_kind

    ours = load_tokenizer(path)
    bos, eos = ours.piece(ours.bos_id), ours.piece(ours.eos_id)
    base: dict = {}
    if tokenizer_kind(path) == TIKTOKEN:
        spec = tiktoken_spec(path)
    else:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        spec["post_processor"] = bos_post_processor(spec.get("post_processor"), bos, ours.bos_id)
        config = config_file(path)
        if config is not None:
            base = json.loads(config.read_text(encoding="utf-8"))
            base = base if isinstance(base, dict) else {}
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(base, bos, eos), indent=1,
                                                              ensure_ascii=False) + "\n")


def generation_config(tokenizer) -> dict[str, Any]:
    """generation_config.json: bos, and every token that ends generation (a list when there are several,
    so an instruct model stops at the end of its turn, not only at the end of the text)."""
    ends = list(tokenizer.end_ids)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": ends[0] if len(ends) == 1 else ends,
            "do_sample": False, "max_new_tokens": 256}


def check_llama3_tokenizer(out_dir: Path, path: Path) -> None:
    """AutoTokenizer on `out_dir` gives [bos] + our ids and decodes them back, on CHECK_TEXTS, and names
    bos, eos and the end tokens with our ids; a JoraError otherwise."""
    from transformers import AutoTokenizer

    from jora_model.data.tokenizer import load_tokenizer

    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(out_dir))
    where = out_dir / "tokenizer.json"
    for token_id in (ours.bos_id, *ours.end_ids):
        if theirs.convert_tokens_to_ids(ours.piece(token_id)) != token_id:
            raise JoraError(f"exported tokenizer gives {ours.piece(token_id)!r} another id than {token_id}", where)
    if (theirs.bos_token_id, theirs.eos_token_id) != (ours.bos_id, ours.eos_id):
        raise JoraError(f"exported tokenizer's bos/eos are {theirs.bos_token_id}/{theirs.eos_token_id}, "
                        f"not {ours.bos_id}/{ours.eos_id}", where)
    specials = [str(t) for t in theirs.added_tokens_decoder.values()]
    for text in CHECK_TEXTS:
        expected = [ours.bos_id] + ours.encode(text)
        answers = [theirs(text, split_special_tokens=True)["input_ids"]]
        if not any(s in text for s in specials):  # transformers' default mode: see the module docstring
            answers.append(theirs(text)["input_ids"])
        for got in answers:
            if got != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                raise JoraError(f"exported tokenizer disagrees with ours on {text!r} at token {at}: "
                                f"{got[at:at + 3]} vs {expected[at:at + 3]}", where)
        if theirs.decode(expected, skip_special_tokens=True) != ours.decode(expected):
            raise JoraError(f"exported tokenizer decodes {text!r} differently", where)
