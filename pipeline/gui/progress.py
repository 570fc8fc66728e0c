"""What a run is doing, read from what it already writes: the stages' log lines ("train: skipped, ...",
"merge: wrote ...") and the work directory's documented layout (store/, tokenized/, train/, merged/,
hf-model/, peft-adapter/; metrics.jsonl in train's `.train.work-KEY/` while it trains).

Reading files and log lines rather than hooking into the flow means the same code watches a run in a
child process and a run of a Prefect deployment served on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from pipeline.settings import FinetuneSettings

# In the order the flow runs them; each writes work/<OUTPUTS[stage]>.
STAGES = ("convert", "tokenize", "train", "evaluate", "merge", "export", "export-adapter")
OUTPUTS = {"convert": "store", "tokenize": "tokenized", "train": "train", "evaluate": "evaluate", "merge": "merged",
           "export": "hf-model",
           "export-adapter": "peft-adapter"}
# stages/base.py logs "STAGE: skipped, ..." and "STAGE: wrote ..."; flow.py logs "STAGE: ran, wrote ...".
# export-adapter comes first in the alternation so that "export-adapter:" never reads as "export".
_EVENT = re.compile(r"\b(export-adapter|convert|tokenize|train|evaluate|merge|export): (skipped|ran|wrote)\b")
# What follows is published only when the gate lets the new adapter through (flow.py).
GATED = ("merge", "export", "export-adapter")


# The export step of export-adapter writes the unmerged base here first (flow.py), logging "export: ..."
# lines of its own, which say nothing about the export of the merged model (hf-model).
PEFT_BASE = "hf-base"


def stage_event(line: str) -> tuple[str, str] | None:
    """(stage, "ran" | "skipped") when `line` says a stage finished."""
    match = _EVENT.search(line)
    if not match or (match.group(1) == "export" and f"/{PEFT_BASE}" in line):
        return None
    if match.group(1) == "evaluate" and "/evaluate-" in line:  # the gate's evaluation of the published model
        return None
    return match.group(1), "skipped" if match.group(2) == "skipped" else "ran"


def stage_states(finished: dict[str, str], status: str, settings: FinetuneSettings,
                 kept_back: bool = False) -> dict[str, str]:
    """Every stage's state: ran / skipped (from its log line); for the first unfinished one (the flow runs
    them one after another) the run's: running, failed or stopped; the rest waiting, or off (not asked
    for), or kept (the gate held the new adapter back: what was published stays). `status` is the run's:
    running, succeeded, failed or stopped."""
    states: dict[str, str] = {}
    current_found = False
    for stage in STAGES:
        if (stage == "export-adapter" and not settings.export.peft_adapter) or \
                (stage == "evaluate" and not settings.eval.gate):
            states[stage] = "off"
        elif kept_back and stage in GATED and stage not in finished:
            states[stage] = "kept"
        elif stage in finished:
            states[stage] = finished[stage]
        elif not current_found and status in ("running", "failed", "stopped"):
            states[stage] = status
            current_found = True
        else:
            states[stage] = "waiting"
    return states


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written right now
            break
    return records


def train_metrics(work: Path, train_state: str) -> list[dict[str, Any]]:
    """metrics.jsonl of the training in progress or interrupted (its `.train.work-KEY/`), or of the
    finished one."""
    if train_state in ("running", "stopped", "failed"):
        live = sorted(work.glob(".train.work-*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
        return _read_jsonl(live[-1]) if live else []
    if train_state in ("ran", "skipped"):
        return _read_jsonl(work / "train" / "metrics.jsonl")
    return []


def total_steps(work: Path, settings: FinetuneSettings) -> int | None:
    """Optimizer steps the run will take, as jora_model.training.trainer counts them: whole batches per epoch
    (the short last one is dropped), grouped by grad_accum, capped at max_steps."""
    try:
        rows = json.loads((work / "tokenized" / "stats.json").read_text())["splits"]["train"]["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    t = settings.train
    steps = max(1, math.ceil(t.epochs * (rows // t.batch_size) / t.grad_accum))
    return min(steps, t.max_steps) if t.max_steps else steps


class StepClock:
    """ETA from the pace of the steps seen so far. The clock starts at the first step it sees, so the
    first step's compilation does not count against the rest."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last_step = -1

    def eta(self, step: int, total: int | None, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self.first is None or step < self.first[1]:
            self.first = (now, step)
        self.last_step = step
        started, first_step = self.first
        if total is None or step <= first_step or now <= started:
            return None
        return (total - step) * (now - started) / (step - first_step)


@dataclasses.dataclass(frozen=True)
class Outputs:
    hf_model: Path | None  # Hugging Face directory (export)
    peft_adapter: Path | None  # the adapter for peft (export-adapter)
    adapter: Path | None  # jora's adapter (train/adapter), for `jora generate --adapter`
    store: Path | None  # the base model's parameter store, for `jora generate --model`
    eval_loss: float | None  # the last evaluation of the finished training
    final_loss: float | None  # training loss at the last step
    steps: int | None


def _finished(path: Path) -> bool:
    return (path / "jora-manifest.json").is_file()


def outputs(work: Path) -> Outputs:
    """The finished outputs under `work` (None where a stage's output is not there)."""
    facts: dict[str, Any] = {}
    if _finished(work / "train"):
        facts = json.loads((work / "train" / "jora-manifest.json").read_text()).get("facts", {})

    def ready(name: str, sub: str = "") -> Path | None:
        return (work / name / sub) if _finished(work / name) else None

    return Outputs(ready("hf-model"), ready("peft-adapter"), ready("train", "adapter"), ready("store"),
                   facts.get("eval_loss"), facts.get("final_loss"), facts.get("steps"))


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "estimating"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s") + " left"


def gate_summary(work: Path) -> tuple[str, bool]:
    """The newest run's gate (lineage.json): its decision and the two models' scores as a Markdown table,
    and whether it kept the new adapter back. ("", False) when the run had no gate."""
    try:
        runs = json.loads((work / "lineage.json").read_text(encoding="utf-8"))["runs"]
        gate = runs[-1].get("gate")
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "", False
    if not gate:
        return "", False
    decision, reports = gate["decision"], gate.get("reports", {})
    rows = ["| model | exact match | token F1 | loss | exact match without context |", "|---|---|---|---|---|"]
    for side, name in (("new", "new adapter"), ("published", decision.get("against", "published"))):
        report = reports.get(side) or {}
        no_context = report.get("no_context") or {}
        rows.append(f"| {plain(name)} | {_figure(report.get('exact_match'))} | {_figure(report.get('token_f1'))} | "
                    f"{_figure(report.get('loss'))} | {_figure(no_context.get('exact_match'))} |")
    return f"**Gate**: {plain(decision['reason'])}\n\n" + "\n".join(rows), not decision["promote"]


def _figure(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def plain(text: Any) -> str:
    """`text` as literal Markdown: messages can quote values read from any JSON or YAML file, which
    must not turn into links, images or HTML on the page. CommonMark lets a backslash escape any ASCII
    punctuation."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", str(text))
