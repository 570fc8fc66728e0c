"""Stage: evaluate a model (a store, with an adapter or without) on a golden set by generating answers.

Inputs: a parameter store, optionally an adapter (a train output or its adapter/ directory), and the golden
set: an Alpaca JSON / JSON Lines file, or tokenized shards (a tokenize output, whose val/ split is taken, or
a split directory). Output: `report.json` and `predictions.jsonl` (jora_model.evaluation.report). Cache
key: the store's key, the adapter's hash, the golden set's content hash, the settings with the prompt
template resolved, and CODE_VERSION.

The prompt template: what golden shards recorded (they hold the prompts already; another one is refused),
else --template/--system, else what the --tokenized training shards recorded, else alpaca. An adapter
records no template of its own, so for a JSON golden set give --tokenized (the flow does) or --template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from jora_model.data.templates import NAMES as TEMPLATES
from jora_model.errors import JoraError
from jora_model.schema import check_settings, setting

from .base import StageResult, adapter_input, run_stage, upstream_key
from .merge import ALLOW_OTHER_BASE
from .options import settings_options

CODE_VERSION = "evaluate-1"


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    template: str | None = setting(None, "prompt template [default: the one the golden shards or --tokenized "
                                   "recorded, else alpaca]", choices=TEMPLATES)
    system: str | None = setting(None, "system prompt [default: the one the golden shards or --tokenized recorded]")
    max_new_tokens: int | None = setting(None, "longest answer in tokens [default: the longest reference's "
                                         "tokens + 16, at most 512]", ge=1)
    max_seq_len: int | None = setting(None, "longest prompt plus reference in tokens of a JSON golden set; longer "
                                      "records are cut as tokenize cuts them [default: the --tokenized shards' "
                                      "max_seq_len, else the model's context]", ge=8)
    batch_size: int = setting(8, "prompts answered together (of similar length)", ge=1)
    compute_dtype: str = setting("float32", "dtype of the activations", choices=("float32", "bfloat16"))

    def __post_init__(self) -> None:
        check_settings(self)


def evaluate(model: str | Path, data: str | Path, out: str | Path, adapter: str | Path | None = None,
             settings: EvaluateSettings = EvaluateSettings(), tokenized: str | Path | None = None,
             force: bool = False, allow_other_base: bool = False) -> StageResult:
    """Evaluate the store `model` (with `adapter`) on the golden set `data` into `out` (skipped when up to
    date). `tokenized`: the shards the adapter was trained on, whose template prompts a JSON golden set."""
    from jora_model.data.tokenizer import load_tokenizer
    from jora_model.formats.adapter import check_base

    model, data, out = Path(model), Path(data), Path(out)
    upstream = {"model": upstream_key(model, "parameter store")}
    adapter_path = None
    if adapter is not None:
        adapter_path, upstream["adapter"] = adapter_input(adapter)
        check_base(adapter_path, model, upstream["model"], allow_other_base)
    if settings.max_seq_len is None and tokenized is not None:
        settings = dataclasses.replace(settings, max_seq_len=_tokenized_max_len(Path(tokenized)))
    tokenizer = load_tokenizer(model)
    split = _golden_shards(data, model)
    template = _template(tokenizer, split, tokenized, settings)
    inputs = {} if split is not None else {"data": data}
    if split is not None:
        from jora_model.evaluation.golden import shards_sha256

        upstream["data"] = shards_sha256(split)
    key_settings = {**dataclasses.asdict(settings), "template": template.name, "system": template.system,
                    "chat_template": hashlib.sha256(template.source.encode()).hexdigest() if template.source else None}
    identities = {"model": {"path": str(model.resolve()), "key": upstream["model"]},
                  "adapter": None if adapter_path is None else {"path": str(adapter_path.resolve()),
                                                                "sha256": upstream["adapter"]},
                  "template": {"name": template.name, "system": template.system}}

    def build(tmp: Path) -> dict[str, Any]:
        return _build(tmp, model, adapter_path, data, split, tokenizer, template, settings, identities)

    return run_stage("evaluate", CODE_VERSION, out, inputs, key_settings, build, force=force, upstream=upstream)


def _tokenized_max_len(tokenized: Path) -> int | None:
    """The max_seq_len the training shards were cut to (their stats.json), so that the golden prompts
    are cut as training's were; None when they do not say."""
    try:
        value = json.loads((tokenized / "stats.json").read_text())["settings"]["max_seq_len"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value >= 8 else None


def _golden_shards(data: Path, model: Path) -> Path | None:
    """The shard split of a golden set given as a directory (checked to come from the store's tokenizer);
    None for a file."""
    if not data.is_dir():
        return None
    from jora_model.data.shards import ShardSet
    from jora_model.data.tokenizer import resolve_tokenizer
    from jora_model.evaluation.golden import shard_split
    from jora_model.training.setup import check_tokenizer

    split = shard_split(data)
    check_tokenizer(ShardSet(split), SimpleNamespace(path=model, tokenizer_path=resolve_tokenizer(model)))
    return split


def _template(tokenizer: Any, split: Path | None, tokenized: Path | None, settings: EvaluateSettings) -> Any:
    from jora_model.data.shards import ShardSet
    from jora_model.data.templates import load_template, shards_template

    if split is not None:
        recorded = ShardSet(split).metadata()
        name, system = recorded.get("jora.template", "alpaca"), recorded.get("jora.system")
        if settings.template not in (None, name) or settings.system not in (None, system):
            raise JoraError(f"the golden shards hold prompts made with template {name}"
                            + (f" and system prompt {system!r}" if system else " and no system prompt")
                            + "; --template/--system cannot change them", split)
        return shards_template(split, tokenizer)
    if tokenized is not None:
        return shards_template(Path(tokenized), tokenizer, settings.template, settings.system)
    return load_template(settings.template or "alpaca", tokenizer, settings.system)


def _build(tmp: Path, model: Path, adapter: Path | None, data: Path, split: Path | None, tokenizer: Any,
           template: Any, settings: EvaluateSettings, identities: dict[str, Any]) -> dict[str, Any]:
    from jora_model import load_model
    from jora_model.evaluation import golden as goldens
    from jora_model.evaluation import report as reports
    from jora_model.evaluation.run import evaluate_golden

    loaded = load_model(model, dtype=settings.compute_dtype, adapter=adapter)
    if split is not None:
        golden = goldens.from_shards(split, tokenizer)
    else:
        golden = goldens.from_records(data, tokenizer, template, settings.max_seq_len or loaded.config.max_seq_len)
    figures, lines = evaluate_golden(loaded, tokenizer, golden, template.stop_ids, settings.batch_size,
                                     settings.max_new_tokens)
    report = {**figures, "data": str((split or data).resolve()), "data_sha256": golden.sha256,
              "data_kind": golden.kind, **identities}
    reports.write(tmp, report, lines)
    return {k: report[k] for k in ("n", *reports.METRICS)} | {
        "no_context": {k: report["no_context"][k] for k in reports.METRICS} if report["no_context"] else None}


@click.command("evaluate")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path), help="parameter store.")
@click.option("--adapter", type=click.Path(path_type=Path), default=None,
              help="a train output or its adapter/ directory [default: the base model alone].")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="the golden set: Alpaca JSON / JSON Lines, or tokenized shards (a tokenize output: its val/ split).")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tokenized", type=click.Path(path_type=Path), default=None,
              help="the tokenize output the adapter was trained on: prompt with its template and system prompt.")
@settings_options(EvaluateSettings, "settings")
@click.option("--force", is_flag=True, help="evaluate again even when the output is up to date.")
@click.option("--allow-other-base", is_flag=True, help=ALLOW_OTHER_BASE)
def evaluate_command(model: Path, adapter: Path | None, data: Path, out: Path, tokenized: Path | None,
                     settings: EvaluateSettings, force: bool, allow_other_base: bool) -> None:
    """Answer the golden set --data greedily with --model (and --adapter); write OUT/report.json (exact
    match, token F1, loss, perplexity; the same without the context) and OUT/predictions.jsonl."""
    from jora_model.evaluation.report import REPORT, format_summary

    result = evaluate(model, data, out, adapter, settings, tokenized, force=force, allow_other_base=allow_other_base)
    click.echo(f"{'skipped (up to date)' if result.skipped else 'evaluated'}: {result.out_dir}")
    click.echo(format_summary(json.loads((result.out_dir / REPORT).read_text())))
