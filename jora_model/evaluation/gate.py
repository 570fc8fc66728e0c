"""The evaluation gate: does a newly trained adapter answer at least as well as the one published?

Two evaluation reports of the same golden set (jora_model/evaluation/report.py: `exact_match`,
`token_f1`, `loss`, `perplexity`) are compared on one metric. The new adapter is promoted unless it is
worse than the published model by more than the tolerance, so that retraining on refreshed context goes
on when the scores tie and noise on a small golden set does not hold every retrain back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jora_model.evaluation.report import LOWER_IS_BETTER, METRICS, metric
from jora_model.schema import check_settings, setting


@dataclasses.dataclass(frozen=True)
class GateSettings:
    gate: bool = setting(True, "publish a new adapter only if it answers the golden set about as well as the "
                               "published one (else keep the published model and say why)")
    metric: str = setting("token_f1", "what the gate compares: token_f1, exact_match (higher is better), loss or "
                                      "perplexity (lower is better)", choices=tuple(METRICS))
    tolerance: float = setting(0.01, "how much worse than the published model the new adapter may score and "
                                     "still be published", ge=0)

    def __post_init__(self) -> None:
        check_settings(self)


@dataclasses.dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    new: float
    published: float
    against: str  # what was published: "base model" or "published model"
    reason: str  # one line, with both scores

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decide(new: dict[str, Any], published: dict[str, Any], settings: GateSettings, against: str) -> Decision:
    """Promote `new` (a report) over `published` (the report of what is published now, `against`)?"""
    mine, theirs = (metric(report, settings.metric) for report in (new, published))
    margin = (mine - theirs) if settings.metric in LOWER_IS_BETTER else (theirs - mine)  # > 0: the new is worse
    promote = margin <= settings.tolerance
    verdict = "published" if promote else "kept back"
    relation = f"{abs(margin):.4f} {'worse' if margin > 0 else 'better'} than" if margin else "equal to"
    reason = (f"new adapter {verdict}: {settings.metric} {mine:.4f}, {relation} the {against}'s {theirs:.4f} "
              f"(tolerance {settings.tolerance:g})")
    return Decision(promote, settings.metric, mine, theirs, against, reason)



def already_published(new: dict[str, Any], metric_name: str) -> Decision:
    """The decision when what is published holds this very adapter (a rerun on unchanged data): nothing
    to compare, and nothing to hold back."""
    score = metric(new, metric_name)
    return Decision(True, metric_name, score, score, "published model",
                    "new adapter published: the published model already holds it")
