"""Stage 2, tokenize: Alpaca JSON (or JSON Lines) -> tokenized Arrow shards with a response-only mask.

Inputs: the data file and the tokenizer (SentencePiece, Meta's tiktoken ranks file or an HF tokenizer.json,
with the tokenizer_config.json beside it when there is one: its bos/eos and chat template). Output: `train/`
and `val/` split directories of Arrow shards (jora_model.data.shards) that record the prompt template and
system prompt (jora_model.data.templates), and `stats.json`. Cache key: the input files' contents, every
setting below and CODE_VERSION (the worker count is not in it: it never changes the bytes written).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import click

from jora_model.data.templates import NAMES as TEMPLATES
from jora_model.errors import JoraError
from jora_model.schema import check_settings, setting

from .base import StageResult, file_sha256, run_stage
from .options import settings_options

CODE_VERSION = "tokenize-2"  # 2: the shards record the tokenizer's hash
log = logging.getLogger("jora")
_CHUNK = 512  # records per task sent to a worker


@dataclasses.dataclass(frozen=True)
class TokenizeSettings:
    max_seq_len: int = setting(2000, "longest example in tokens, bos and eos included; longer ones lose retrieved "
                               "context first, then instruction, never the response", ge=8)
    val_fraction: float = setting(0.05, "share of records held out for evaluation", ge=0, lt=1)
    seed: int = setting(420, "decides which records are held out")
    template: str = setting("alpaca", "prompt template: alpaca, llama2-chat, llama3-chat, or auto (the tokenizer's "
                            "own chat template, else alpaca)", choices=TEMPLATES)
    system: str | None = setting(None, "system prompt of the template, e.g. \"Answer from the context.\"")
    pack: bool = setting(False, "pack several short examples per row (segment ids keep them apart)")
    strict: bool = setting(True, "stop at the first bad record (else skip bad records and count them)",
                           off="--lenient")

    def __post_init__(self) -> None:
        check_settings(self)


# --- worker side: one tokenizer and template per process, loaded once -------------------------------
_worker_tokenizer = None
_worker_template = None


def _init_worker(tokenizer_path: str, template: str, system: str | None) -> None:
    global _worker_tokenizer, _worker_template
    from jora_model.data.templates import load_template
    from jora_model.data.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_path)
    _worker_template = load_template(template, _worker_tokenizer, system)


def _start_worker(parent_pid: int, *init) -> None:
    """A pool worker's initializer: end with the parent however it ends (a killed `jora tokenize`
    must not leave its workers running), then load the tokenizer."""
    from stages.children import die_with_parent

    die_with_parent(parent_pid)
    _init_worker(*init)


def _tokenize_chunk(task: tuple[list[tuple[int, dict]], int]) -> list:
    from jora_model.data.alpaca import tokenize_record

    chunk, max_len = task
    return [tokenize_record(_worker_tokenizer, record, i, max_len, _worker_template) for i, record in chunk]


def _tokenized(records: list[tuple[int, dict]], tokenizer_path: Path, settings: TokenizeSettings,
               workers: int) -> Iterator:
    """Examples in record order, tokenized by `workers` spawned processes (fork is unsafe once JAX or
    torch threads exist in the parent)."""
    tasks = [(records[i:i + _CHUNK], settings.max_seq_len) for i in range(0, len(records), _CHUNK)]
    init = (str(tokenizer_path), settings.template, settings.system)
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(*init)
        for task in tasks:
            yield from _tokenize_chunk(task)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    # An executor, not multiprocessing.Pool: a worker that dies (out of memory, say) raises here instead
    # of leaving the parent waiting forever. map keeps the order: the same bytes every run.
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), *init)) as pool:
        try:
            for examples in pool.map(_tokenize_chunk, tasks):
                yield from examples
        except BrokenProcessPool:
            raise JoraError("a tokenizer worker process died (out of memory?); nothing was written") from None


def _histogram(lengths: list[int], max_len: int, bins: int = 8) -> list[dict[str, int]]:
    edges = [round(max_len * i / bins) for i in range(bins + 1)]
    counts = Counter(min(bins - 1, (n * bins - 1) // max_len) for n in lengths)
    return [{"from": edges[i] + 1, "to": edges[i + 1], "count": counts.get(i, 0)} for i in range(bins)]


def tokenize(data: str | Path, out: str | Path, tokenizer: str | Path,
             settings: TokenizeSettings = TokenizeSettings(), workers: int | None = None,
             force: bool = False) -> StageResult:
    """Tokenize `data` into `out` (skipped when up to date). Returns the stage result; its manifest's
    facts hold the report (see `format_report`)."""
    from jora_model.data.tokenizer import resolve_tokenizer

    data, out = Path(data), Path(out)
    tokenizer_path = resolve_tokenizer(tokenizer)
    if not data.is_file():
        raise JoraError("data file not found", data)
    workers = workers or min(os.cpu_count() or 1, 8)

    def build(tmp: Path) -> dict[str, Any]:
        return _build(tmp, data, tokenizer_path, settings, workers)

    return run_stage("tokenize", CODE_VERSION, out, _input_files(data, tokenizer_path),
                     dataclasses.asdict(settings), build, force=force)


def _input_files(data: Path, tokenizer_path: Path) -> dict[str, Path]:
    """The files whose contents decide the output: a tokenizer.json's neighbouring tokenizer_config.json
    can choose its bos/eos, so it counts too."""
    from jora_model.data.hf_tokenizer import config_file
    from jora_model.data.tokenizer_files import HF_JSON, tokenizer_kind

    files = {"data": data, "tokenizer": tokenizer_path}
    config = config_file(tokenizer_path) if tokenizer_kind(tokenizer_path) == HF_JSON else None
    if config is not None:
        files["tokenizer_config"] = config
    return files


def _usable_records(data: Path, strict: bool) -> tuple[list, list[tuple[int, dict]], Counter]:
    """(every record, the good ones with their index, the bad ones' problems counted). Lenient, a JSON
    Lines line that does not parse is a bad record too (strict, read_records names its line)."""
    from jora_model.data.alpaca import UnreadableLine, check_record, read_records

    records = read_records(data, skip_bad_lines=not strict)
    good: list[tuple[int, dict]] = []
    invalid: Counter[str] = Counter()
    for i, record in enumerate(records):
        problem = "not valid JSON" if isinstance(record, UnreadableLine) else check_record(record)
        if problem is None:
            good.append((i, record))
        elif strict:
            raise JoraError(f"record {i}: {problem} (use --lenient to skip bad records)", data)
        else:
            invalid[problem] += 1
    if not good:
        raise JoraError("no usable records", data)
    unreadable = [record.line for record in records if isinstance(record, UnreadableLine)]
    if unreadable:  # the report counts them; this says where they are
        shown = ", ".join(map(str, unreadable[:10]))
        more = f", ... ({len(unreadable)} in all)" if len(unreadable) > 10 else ""
        log.warning("%s: skipping %s %s%s: not valid JSON", data, "line" if len(unreadable) == 1 else "lines",
                    shown, more)
    return records, good, invalid


def _build(tmp: Path, data: Path, tokenizer_path: Path, settings: TokenizeSettings, workers: int) -> dict[str, Any]:
    """Write the shards and stats.json into `tmp`; return the report."""
    import numpy as np

    from jora_model.data.alpaca import held_out
    from jora_model.data.packing import pack
    from jora_model.data.shards import TOKENIZER_KEY, Row, ShardWriter
    from jora_model.data.templates import load_template
    from jora_model.data.tokenizer import load_tokenizer

    # A bad tokenizer, or a template it cannot spell, fails here, in the parent, with its own message.
    template = load_template(settings.template, load_tokenizer(tokenizer_path), settings.system)
    records, good, invalid = _usable_records(data, settings.strict)
    val_ids = held_out(len(records), settings.val_fraction, settings.seed)
    # The template goes into the shards so that generation prompts as training did; the tokenizer's hash
    # so that train can refuse ids made by another tokenizer (they fit its vocabulary and mean other words).
    metadata = {**template.metadata(), TOKENIZER_KEY: file_sha256(tokenizer_path)}
    writers = {split: ShardWriter(tmp / split, metadata=metadata) for split in ("train", "val")}
    stats = {split: {"examples": 0, "rows": 0, "tokens": 0, "loss_tokens": 0, "lengths": []} for split in writers}
    dropped: Counter[str] = Counter({f"invalid record: {k}": v for k, v in invalid.items()})
    cut = {"examples": 0, "tokens": 0, "input": 0, "instruction": 0}
    kept: dict[str, list] = {"train": [], "val": []} if settings.pack else {}

    for example in _tokenized(good, tokenizer_path, settings, workers):
        if example.dropped:
            dropped[example.dropped] += 1
            continue
        split = "val" if example.example_id in val_ids else "train"
        s = stats[split]
        s["examples"] += 1
        s["tokens"] += len(example.input_ids)
        s["loss_tokens"] += int(example.loss_mask.sum())
        s["lengths"].append(len(example.input_ids))
        if example.cut_tokens:
            cut["examples"] += 1
            cut["tokens"] += example.cut_tokens
            for field in example.cut_fields:
                cut[field] += 1
        if settings.pack:
            kept[split].append((example.example_id, example.input_ids, example.loss_mask))
        else:
            writers[split].add(Row([example.example_id], example.input_ids, example.loss_mask,
                                   np.ones(len(example.input_ids), np.int32)))
    for split, writer in writers.items():
        if settings.pack:
            for row in pack(kept[split], settings.max_seq_len):
                writer.add(row)
        writer.close()
        stats[split]["rows"] = writer.rows
    written = stats["train"]["examples"] + stats["val"]["examples"]
    if written == 0:
        raise JoraError(f"every record was dropped ({', '.join(f'{k}: {v}' for k, v in dropped.items())})", data)
    report = {
        "examples_in": len(records), "written": written, "cut": cut, "dropped": dict(dropped),
        "splits": {split: {k: v for k, v in s.items() if k != "lengths"} |
                   {"length_histogram": _histogram(s["lengths"], settings.max_seq_len),
                    "longest": max(s["lengths"], default=0)} for split, s in stats.items()},
        "tokenizer": {"path": str(tokenizer_path)}, "settings": dataclasses.asdict(settings),
        "template": template.name,
    }
    (tmp / "stats.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    cut, lines = report["cut"], []
    lines.append(f"examples in: {report['examples_in']}, written: {report['written']}, "
                 f"cut: {cut['examples']} ({cut['tokens']} prompt tokens; context cut in {cut['input']}, "
                 f"instruction cut in {cut['instruction']})")
    dropped = report["dropped"]
    lines.append("dropped: " + (", ".join(f"{n} {reason}" for reason, n in dropped.items()) if dropped else "none"))
    for split, s in report["splits"].items():
        lines.append(f"{split}: {s['examples']} examples in {s['rows']} rows, {s['tokens']} tokens "
                     f"({s['loss_tokens']} trained on), longest {s['longest']}")
        peak = max((b["count"] for b in s["length_histogram"]), default=0) or 1
        for b in s["length_histogram"]:
            bar = "#" * round(30 * b["count"] / peak)
            lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>8} {bar}".rstrip())
    return "\n".join(lines)


@click.command("tokenize")
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer", required=True, type=click.Path(path_type=Path),
              help="a tokenizer.model (SentencePiece or Meta's tiktoken), a tokenizer.json, or a parameter store "
                   "(which names its tokenizer).")
@settings_options(TokenizeSettings, "settings")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="tokenizer processes [default: the CPU count, at most 8].")
@click.option("--force", is_flag=True, help="rebuild even when the output is up to date.")
def tokenize_command(data: Path, out: Path, tokenizer: Path, settings: TokenizeSettings, workers: int | None,
                     force: bool) -> None:
    """Tokenize an Alpaca JSON / JSON Lines file DATA into Arrow shards in OUT (train/ and val/)."""
    result = tokenize(data, out, tokenizer, settings, workers=workers, force=force)
    verb = "skipped (up to date)" if result.skipped else "tokenized"
    click.echo(f"{verb}: {result.out_dir}")
    click.echo(format_report(result.manifest["facts"]))
