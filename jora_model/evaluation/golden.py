"""The golden set an adapter is evaluated on, as requests: prompt ids, reply ids (the loss's targets) and
the reference answer.

From Alpaca records (JSON or JSON Lines): each record tokenized exactly as the tokenize stage does it
(jora_model.data.alpaca.tokenize_record: too long, the context is cut first, then the instruction), once
as it is and once with `input` emptied (the no-context ablation). From tokenized shards (a tokenize
output's val/ split, say): each example of each row (packed rows hold several, told apart by segment id),
the prompt its unmasked prefix and the reference its masked part less the end token. The prompt's text
is gone from shards, so the context cannot be taken out: they have no no-context requests.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from jora_model.errors import JoraError

SHARDS_NO_CONTEXT = ("the golden set is tokenized shards, which hold the prompt as token ids only: the "
                     "retrieved context cannot be told apart from the rest of the prompt to empty it")


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: np.ndarray  # int32 [P]: what the model is prompted with, bos first
    reply: np.ndarray  # int32 [R]: the reference reply and its end token, the loss's targets

    def teacher_forced(self) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, loss_mask) as tokenize writes them."""
        ids = np.concatenate([self.prompt, self.reply]).astype(np.int32)
        return ids, np.arange(len(ids)) >= len(self.prompt)


@dataclasses.dataclass(frozen=True)
class GoldenExample:
    index: int  # the record's index in the golden file (a shard example's example id)
    reference: str  # the answer the prediction is compared with
    request: Request
    no_context: Request | None  # the same record with `input` emptied; None for shards
    truncated: bool = False  # the prompt was cut to fit


@dataclasses.dataclass(frozen=True)
class GoldenSet:
    examples: list[GoldenExample]
    kind: str  # "alpaca" (records) or "shards"
    sha256: str  # of the golden file, or of the shard files in order
    truncated: int | None  # records cut to fit (None for shards: tokenize cut them and counted them)
    dropped: dict[str, int]  # records left out, by reason (a response too long for max_seq_len)
    no_context_reason: str | None  # why there is no no-context ablation, or None


def _split(ids: np.ndarray, mask: np.ndarray, where: Path, what: str) -> Request:
    """An example's ids cut where its loss mask starts; the mask must cover exactly the tail."""
    if not mask.any():
        raise JoraError(f"{what}: an example without response tokens", where)
    n = int(np.argmax(mask))
    if n == 0 or not mask[n:].all():
        raise JoraError(f"{what}: the loss mask is not one prompt followed by one response", where)
    return Request(ids[:n].astype(np.int32), ids[n:].astype(np.int32))


def golden_records(path: Path) -> list[dict]:
    """The records of an Alpaca JSON / JSON Lines golden set; a bad one is an error naming it (the flow
    checks this before training, so a broken golden set fails in a second, not after the run)."""
    from jora_model.data.alpaca import check_record, read_records

    records = read_records(path)
    for i, record in enumerate(records):
        problem = check_record(record)
        if problem is not None:
            raise JoraError(f"golden set record {i}: {problem}", path)
    return records


def from_records(path: Path, tokenizer: Any, template: Any, max_len: int) -> GoldenSet:
    """Every record of an Alpaca JSON / JSON Lines file; a bad record is an error naming it."""
    from jora_model.data.alpaca import tokenize_record

    records = golden_records(path)
    examples, dropped = [], Counter()
    for i, record in enumerate(records):
        full = tokenize_record(tokenizer, record, i, max_len, template)
        bare = tokenize_record(tokenizer, {**record, "input": ""}, i, max_len, template)
        if full.dropped or bare.dropped:
            dropped[full.dropped or bare.dropped] += 1
            continue
        where = f"record {i}"
        examples.append(GoldenExample(i, record["output"] or "", _split(full.input_ids, full.loss_mask, path, where),
                                      _split(bare.input_ids, bare.loss_mask, path, where), bool(full.cut_tokens)))
    if not examples:
        raise JoraError(f"no record fits max_seq_len {max_len} ({', '.join(dropped)})", path)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return GoldenSet(examples, "alpaca", digest, sum(e.truncated for e in examples), dict(dropped), None)


def shard_split(path: Path) -> Path:
    """The split directory of a golden set given as a tokenize output (its val/ split) or a split."""
    path = Path(path)
    return path / "val" if (path / "val").is_dir() else path


def shards_sha256(split: Path) -> str:
    """One hash over the split's shard files, names and contents, in order."""
    from jora_model.data.shards import ShardSet

    digest = hashlib.sha256()
    for file in ShardSet(split).files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def from_shards(split: Path, tokenizer: Any) -> GoldenSet:
    """Every example of a shard split, in example-id order."""
    from jora_model.data.shards import ShardSet

    shards = ShardSet(split)
    examples = []
    for r in range(len(shards)):
        row = shards.row(r)
        segments = list(dict.fromkeys(int(s) for s in row.segment_ids if s > 0))
        if len(segments) != len(row.example_ids):
            raise JoraError(f"row {r} has {len(segments)} segments for {len(row.example_ids)} examples", split)
        for example_id, segment in zip(row.example_ids, segments):
            keep = row.segment_ids == segment
            request = _split(row.input_ids[keep], row.loss_mask[keep], split, f"row {r}")
            examples.append(GoldenExample(int(example_id), tokenizer.decode(request.reply[:-1].tolist()), request,
                                          None))
    if not examples:
        raise JoraError("no examples in the golden shards", split)
    examples.sort(key=lambda e: e.index)
    return GoldenSet(examples, "shards", shards_sha256(split), None, {}, SHARDS_NO_CONTEXT)
