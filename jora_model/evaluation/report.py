"""Per-record and overall figures, and the two files an evaluation writes: report.json (the summary)
and predictions.jsonl (one line per record).

Exact match and token F1 are means over records; the loss is the token-weighted mean NLL over every
record's response tokens (its end token included) and the perplexity exp of that loss.

report.json: n, exact_match, token_f1, loss, perplexity, response_tokens; no_context (the same figures
for the records with `input` emptied, or null with no_context_reason); truncated (records whose prompt
was cut to fit; null for shards, which tokenize cut and counted), dropped (records left out, by reason),
max_new_tokens; data (the golden file or shard split), data_sha256, data_kind; model (path, key),
adapter (path, sha256, or null), template (name, system).

predictions.jsonl, one line per record in golden order: index, reference, truncated, prediction,
prediction_ids, exact_match, token_f1, loss, perplexity, response_tokens, nll (the summed NLL the
overall loss is made of), and no_context: the same for the record without its context, or null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jora_model.errors import JoraError
from jora_model.evaluation.metrics import exact_match, token_f1

REPORT = "report.json"
PREDICTIONS = "predictions.jsonl"
METRICS = ("exact_match", "token_f1", "loss", "perplexity")  # the figures a gate may compare
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def record_figures(prediction: str, reference: str, nll: float, tokens: int) -> dict[str, Any]:
    loss = nll / tokens
    return {"prediction": prediction, "exact_match": exact_match(prediction, reference),
            "token_f1": token_f1(prediction, reference), "loss": loss, "perplexity": _perplexity(loss),
            "response_tokens": tokens, "nll": nll}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The overall figures of records made by record_figures."""
    n, tokens = len(records), sum(r["response_tokens"] for r in records)
    loss = sum(r["nll"] for r in records) / tokens
    return {"n": n, "exact_match": sum(r["exact_match"] for r in records) / n,
            "token_f1": sum(r["token_f1"] for r in records) / n, "loss": loss, "perplexity": _perplexity(loss),
            "response_tokens": tokens}


def metric(report: dict[str, Any], name: str) -> float:
    """One figure of a report by name; an unknown name is refused, listing the known ones."""
    if name not in METRICS:
        raise JoraError(f"unknown evaluation metric {name!r}; known: {', '.join(METRICS)}")
    return float(report[name])


def prediction_line(index: int, reference: str, truncated: bool, main: dict[str, Any],
                    no_context: dict[str, Any] | None) -> dict[str, Any]:
    line = {"index": index, "reference": reference, "truncated": truncated, **main}
    line["no_context"] = no_context
    return line


def write(out_dir: Path, report: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    (Path(out_dir) / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    with open(Path(out_dir) / PREDICTIONS, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def format_summary(report: dict[str, Any]) -> str:
    """Two lines for a terminal: the figures with and without the context."""
    def figures(r: dict[str, Any]) -> str:
        return (f"exact match {r['exact_match']:.3f}, token F1 {r['token_f1']:.3f}, loss {r['loss']:.4f}, "
                f"perplexity {r['perplexity']:.2f}")

    bare = report.get("no_context")
    cut = f" ({report['truncated']} cut to fit)" if report.get("truncated") else ""
    without = f"no context: {figures(bare)}" if bare else f"no context: none ({report.get('no_context_reason')})"
    return f"{report['n']} records: {figures(report)}{cut}\n{without}"
