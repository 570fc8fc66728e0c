"""An evaluation from start to end: greedy answers and teacher-forced losses for every golden request,
with and without the context, gathered into the report and the prediction lines."""

from __future__ import annotations

from typing import Any, Sequence

from jora_model.evaluation import report as reports
from jora_model.evaluation.golden import GoldenSet, Request

NEW_TOKENS_MARGIN = 16  # the default max_new_tokens: the longest reference's tokens plus this...
NEW_TOKENS_CAP = 512  # ...but never more than this


def default_max_new_tokens(golden: GoldenSet) -> int:
    longest = max(len(e.request.reply) for e in golden.examples)
    return min(NEW_TOKENS_CAP, longest + NEW_TOKENS_MARGIN)


def _answer(model: Any, tokenizer: Any, requests: Sequence[Request], references: Sequence[str], stop_ids,
            max_new_tokens: int, batch_size: int) -> list[dict[str, Any]]:
    """record_figures for each request, with its predicted ids."""
    from jora_model.evaluation.greedy import BatchedGreedy
    from jora_model.evaluation.scoring import ResponseScorer

    answers = BatchedGreedy(model, batch_size).generate([r.prompt for r in requests], max_new_tokens, stop_ids)
    losses = ResponseScorer(model, batch_size).score([r.teacher_forced() for r in requests])
    out = []
    for ids, reference, (nll, tokens) in zip(answers, references, losses):
        out.append({**reports.record_figures(tokenizer.decode(ids), reference, nll, tokens), "prediction_ids": ids})
    return out


def evaluate_golden(model: Any, tokenizer: Any, golden: GoldenSet, stop_ids: Sequence[int], batch_size: int = 8,
                    max_new_tokens: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the report's figures, one prediction line per record). `model` is a jora_model.api.LoadedModel."""
    max_new = max_new_tokens or default_max_new_tokens(golden)
    references = [e.reference for e in golden.examples]
    main = _answer(model, tokenizer, [e.request for e in golden.examples], references, stop_ids, max_new, batch_size)
    bare = None
    if golden.no_context_reason is None:
        bare = _answer(model, tokenizer, [e.no_context for e in golden.examples], references, stop_ids, max_new,
                       batch_size)
    figures = {**reports.summarize(main), "no_context": reports.summarize(bare) if bare else None}
    if bare is None:
        figures["no_context_reason"] = golden.no_context_reason
    figures |= {"truncated": golden.truncated, "dropped": golden.dropped, "max_new_tokens": max_new}
    lines = [reports.prediction_line(e.index, e.reference, e.truncated, m, b)
             for e, m, b in zip(golden.examples, main, bare or [None] * len(main))]
    return figures, lines
