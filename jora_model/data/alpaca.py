"""Alpaca records -> token ids with a loss mask over the response only.

An example is the template's prompt ids then its reply ids (jora_model.data.templates). With the
default alpaca template that is `[bos] + prompt + response + [eos]`: the prompt is one of Stanford
Alpaca's two templates, encoded as one string (as a user's prompt is at inference); the response is
encoded on its own so the mask boundary is exact and decoding the masked tokens (less eos) gives the
output back. loss_mask[t] is true where token t is a training target: every reply token and its end token.

Too long for max_len: the retrieved context (`input`) is cut from its end first, then the
instruction; the response and its eos are never cut. When even an empty prompt leaves no room, the
example is dropped with a reason. No example ever has an empty mask.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jora_model.errors import JoraError
from jora_model.data.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from jora_model.data.templates import Template

TEMPLATES: dict[str, tuple[str, str]] = {
    # (with input, without input): the Stanford Alpaca prompts
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}
FIELDS = ("instruction", "input", "output")


def render_prompt(instruction: str, context: str, template: str = "alpaca") -> str:
    try:
        with_input, without_input = TEMPLATES[template]
    except KeyError:
        raise JoraError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}") from None
    if context:
        return with_input.replace("{instruction}", instruction).replace("{input}", context)
    return without_input.replace("{instruction}", instruction)


def check_record(record: Any) -> str | None:
    """Why this record cannot be used, or None."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    for key in ("instruction", "output"):
        if key not in record:
            return f"missing {key!r}"
    for key in FIELDS:
        value = record.get(key, "")
        if value is not None and not isinstance(value, str):
            return f"{key!r} is a {type(value).__name__}, not a string"
    return None


@dataclasses.dataclass
class Example:
    example_id: int
    input_ids: np.ndarray | None  # int32 [T]; None when dropped
    loss_mask: np.ndarray | None  # bool [T]
    cut_tokens: int = 0  # prompt tokens removed to fit
    cut_fields: tuple[str, ...] = ()  # which fields lost text ("input", "instruction")
    dropped: str | None = None  # reason, when the example could not be kept


def tokenize_record(tokenizer: Tokenizer, record: dict[str, str], example_id: int, max_len: int,
                    template: "str | Template" = "alpaca") -> Example:
    """One record as the template lays it out (a template name is loaded for `tokenizer`, without a
    system prompt; pass a loaded Template to tokenize many records)."""
    from jora_model.data.templates import load_template

    if isinstance(template, str):
        template = load_template(template, tokenizer)
    instruction = record.get("instruction") or ""
    context = record.get("input") or ""
    reply_ids = template.reply_ids(instruction, context, record.get("output") or "")
    budget = max_len - len(reply_ids)  # room for the prompt, bos included
    if budget < 1:
        return Example(example_id, None, None, dropped="response longer than max_seq_len")
    prompt_ids = template.prompt_ids(instruction, context)
    full_prompt_len = len(prompt_ids)
    cut_fields: list[str] = []
    # Each pass removes at least the excess (in tokens) from the field being cut; re-encoding the whole
    # prompt catches the piece merges that can shift the count by a token at the cut.
    while len(prompt_ids) > budget:
        excess = len(prompt_ids) - budget
        if context:
            context = _cut(tokenizer, context, excess)
            if "input" not in cut_fields:
                cut_fields.append("input")
        elif instruction:
            instruction = _cut(tokenizer, instruction, excess)
            if "instruction" not in cut_fields:
                cut_fields.append("instruction")
        else:
            return Example(example_id, None, None, dropped="response leaves no room for the prompt template")
        prompt_ids = template.prompt_ids(instruction, context)
    ids = np.concatenate([prompt_ids, reply_ids])
    mask = np.zeros(len(ids), dtype=np.bool_)
    mask[len(prompt_ids):] = True
    return Example(example_id, ids, mask, full_prompt_len - len(prompt_ids), tuple(cut_fields))


def _cut(tokenizer: Tokenizer, text: str, excess: int) -> str:
    n = len(tokenizer.encode_array(text))
    cut = text[: tokenizer.cut_point(text, n - excess)]
    return cut if len(cut) < len(text) else text[:-1]  # always make progress


@dataclasses.dataclass(frozen=True)
class UnreadableLine:
    """Where read_records(skip_bad_lines=True) found a JSON Lines line that does not parse. It keeps the
    line's place in the list, so the records after it keep their numbers (and their train/val split)."""
    line: int  # 1-based, as an editor counts


def read_records(path: "str | Path", skip_bad_lines: bool = False) -> list[Any]:
    """An Alpaca JSON list, or JSON Lines (one record per line). Errors name the line and column.
    skip_bad_lines: a JSON Lines line that does not parse becomes an UnreadableLine instead of an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JoraError("data file not found", path) from None
    except IsADirectoryError:
        raise JoraError("data path is a directory, not a JSON file", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise JoraError(f"not UTF-8: byte 0x{raw[exc.start]:02x} at line {line} (offset {exc.start})", path) from None
    text = text.removeprefix("\ufeff")
    stripped = text.lstrip()
    if not stripped:
        raise JoraError("empty data file", path)
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JoraError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", path) from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON Lines record at line {number}, column {exc.colno}: {exc.msg}"
                if not skip_bad_lines:
                    raise JoraError(problem, path) from None
                records.append(UnreadableLine(number))
    if not records:
        raise JoraError("no records (empty list)", path)
    return records


def held_out(n: int, fraction: float, seed: int) -> set[int]:
    """Record indices of the validation split: a seeded random subset, at least one when asked for any."""
    if fraction <= 0 or n < 2:
        return set()
    count = min(n - 1, max(1, round(n * fraction)))
    return set(np.random.default_rng(seed).permutation(n)[:count].tolist())


@dataclasses.dataclass(frozen=True)
class AlpacaConfig:
    tokenizer: str  # a tokenizer file of any kind load_tokenizer reads, or a parameter store naming one
    max_seq_len: int = 2000  # longest example in tokens, bos and eos included
    val_fraction: float = 0.05  # share of records held out ("test" / "val")
    seed: int = 420  # decides the held-out records
    template: str = "alpaca"  # one of jora_model.data.templates.NAMES
    system: str | None = None  # the system prompt of the template


def generate_alpaca_dataset(path: str | Path, split: str, config: Any) -> list[dict[str, Any]]:
    """The seed library's entry point (config: an AlpacaConfig or the seed's ParallamaConfig): the
    examples of `split` ('train', or 'test'/'val') exactly as the tokenize stage writes them, in record
    order, each a dict with example_id, input_ids, loss_mask. Bad records raise; examples too long to
    keep are left out."""
    if split not in ("train", "test", "val"):
        raise JoraError(f"split must be 'train' or 'test', got {split!r}")
    if hasattr(config, "JAX_PARAMS_PATH"):  # the seed's ParallamaConfig
        from jora_model.seed_api import config_tokenizer

        config = AlpacaConfig(tokenizer=str(config_tokenizer(config)), max_seq_len=config.MAX_SEQ_LEN,
                              seed=config.SEED)
    from jora_model.data.templates import load_template

    tokenizer = load_tokenizer(config.tokenizer)
    template = load_template(getattr(config, "template", "alpaca"), tokenizer, getattr(config, "system", None))
    records = read_records(path)
    val_ids = held_out(len(records), config.val_fraction, config.seed)
    want_val = split != "train"
    out = []
    for i, record in enumerate(records):
        problem = check_record(record)
        if problem is not None:
            raise JoraError(f"record {i}: {problem}", path)
        if (i in val_ids) != want_val:
            continue
        example = tokenize_record(tokenizer, record, i, config.max_seq_len, template)
        if example.dropped is None:
            out.append({"example_id": i, "input_ids": example.input_ids, "loss_mask": example.loss_mask})
    return out
