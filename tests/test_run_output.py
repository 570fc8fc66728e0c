"""What `jora run` tells a user (issue 22): training progress lines and the final losses, each stage
once, no Prefect warning, `-q` quiet; the demo's answer said what to expect of it; and lineage.json, a
history of every run that refuses to replace a file jora did not write."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jora_model.errors import JoraError
from jora_model.training.hooks import StepEnd
from jora_model.training.progress import LINES, ProgressBar, ProgressLines

JORA = Path(sys.executable).with_name("jora")
OUTPUTS = {"convert": "store", "tokenize": "tokenized", "train": "train", "merge": "merged", "export": "hf-model",
           "export-adapter": "peft-adapter"}
# The demo's flow: each stage's name in the summary -> (the name its log lines give, its output). The gate
# scores the new adapter (evaluate/) and, on a first run, the base model (evaluate-base/).
DEMO_FLOW = {"convert": ("convert", "store"), "tokenize": ("tokenize", "tokenized"), "train": ("train", "train"),
             "evaluate": ("evaluate", "evaluate"), "evaluate-base": ("evaluate", "evaluate-base"),
             "merge": ("merge", "merged"), "export": ("export", "hf-model"),
             "export-adapter": ("export-adapter", "peft-adapter")}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steps(progress, clock: Clock, first: int, last: int, seconds: float, evals: dict[int, float] | None = None):
    for step in range(first, last + 1):
        clock.now += seconds
        record = {"step": step, "loss": 10.0 - step / 10, "tokens_per_s": 1000.0 + step}
        if evals and step in evals:
            record["eval_loss"] = evals[step]
        progress(StepEnd(step, record, position=None))


def test_progress_lines_every_few_steps_with_eval_loss_and_eta():
    lines, clock = [], Clock()
    progress = ProgressLines(40, 0, emit=lines.append, clock=clock)
    clock.now = 100.0  # the first step compiles: its 100 s must not count in the ETA
    _steps(progress, clock, 1, 40, 2.0, evals={10: 3.25, 20: 3.125})
    assert 10 <= len(lines) <= 20 and lines[-1].startswith("train: step 40/40 (100%), loss 6.0000")
    assert len(set(lines)) == len(lines)
    at_12 = next(line for line in lines if line.startswith("train: step 12/40"))
    # 2 s a step since step 1, 28 steps to go: 56 s; tokens/s averaged over steps 10-12
    assert at_12 == "train: step 12/40 (30%), loss 8.8000, eval loss 3.2500 (step 10), 1011 tok/s, ETA 0:00:56"
    assert "eval loss 3.1250 (step 20)" in lines[-1] and "ETA" not in lines[-1]
    assert "eval loss" not in lines[0]


def test_progress_lines_count_from_where_a_run_resumed():
    lines, clock = [], Clock()
    progress = ProgressLines(1000, 990, emit=lines.append, clock=clock)
    _steps(progress, clock, 991, 1000, 1.0)
    assert [line.split(",")[0] for line in lines] == [f"train: step {s}/1000 (99%)" for s in range(991, 1000)] + [
        "train: step 1000/1000 (100%)"]
    many, clock = [], Clock()
    _steps(ProgressLines(1000, 0, emit=many.append, clock=clock), clock, 1, 1000, 1.0)
    assert 10 <= len(many) <= 20


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_progress_bar_mode_lines_logs_on_the_leader_only():
    logger, records = logging.getLogger("jora"), Records()
    level = logger.level
    logger.addHandler(records)  # on the logger itself: `jora`'s command line turns its propagation off
    logger.setLevel(logging.INFO)
    try:
        for enabled in (True, False):
            bar = ProgressBar(4, 0, LINES, enabled=enabled)
            _steps(bar, Clock(), 1, 4, 1.0)
            bar.close()
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert [m.split(",")[0] for m in records.messages] == [f"train: step {s}/4 ({25 * s}%)" for s in range(1, 5)]


def test_demo_answer_line_says_what_to_expect():
    from pipeline.demo import ANSWER_NOTE, EXPECTED, answer_line

    line = answer_line("The, and\nabout" + "0" * 400)
    assert line.startswith('A: "The, and about000') and "\n" not in line
    assert line.endswith(f'..." {ANSWER_NOTE}') and f"the answer is {EXPECTED}" in ANSWER_NOTE


# lineage.json: a history, newest last; an old single record is a one-run history; a foreign file stays.

def _stages(tmp_path: Path) -> dict:
    return {name: {"path": str(tmp_path / out), "skipped": name == "convert", "key": f"key-{name}"}
            for name, out in OUTPUTS.items()}


def test_lineage_keeps_every_run_and_reads_the_old_single_record(tmp_path):
    from pipeline.demo import SAMPLE, demo_settings
    from pipeline.flow import LINEAGE_FORMAT, _write_lineage, lineage_history

    settings = demo_settings(tmp_path, tmp_path / "src", SAMPLE)
    path = tmp_path / "lineage.json"
    assert lineage_history(path) == []
    old = {"data": {"path": "monday.json", "sha256": "0" * 64}, "base_model": {}, "settings": {},
           "code_versions": [], "stage_keys": {}, "warm_started_from": None}
    path.write_text(json.dumps(old))
    _write_lineage(tmp_path, settings, _stages(tmp_path))
    _write_lineage(tmp_path, settings.model_copy(update={"train": settings.train.model_copy(update={"lr": 5e-3})}),
                   _stages(tmp_path))
    lineage = json.loads(path.read_text())
    assert lineage["format"] == LINEAGE_FORMAT and lineage_history(path) == lineage["runs"]
    monday, first, newest = lineage["runs"]
    assert monday == old
    assert first["data"]["path"] == str(SAMPLE) and len(first["data"]["sha256"]) == 64
    assert first["settings"]["train"]["lr"] == settings.train.lr != 5e-3 and newest["settings"]["train"]["lr"] == 5e-3
    assert newest["ran"] == [name for name in OUTPUTS if name != "convert"] and newest["finished"]
    assert not list(tmp_path.glob(".lineage*"))


@pytest.mark.parametrize("text", ['{"runs": []}', "[1, 2]", "not json", '{"format": "other", "runs": []}'])
def test_lineage_refuses_a_file_jora_did_not_write(tmp_path, text):
    from pipeline.demo import SAMPLE, demo_settings
    from pipeline.flow import _write_lineage

    path = tmp_path / "lineage.json"
    path.write_text(text)
    with pytest.raises(JoraError, match=rf"^{re.escape(str(path))}: not a lineage file jora wrote; refusing"):
        _write_lineage(tmp_path, demo_settings(tmp_path, tmp_path / "src", SAMPLE), _stages(tmp_path))
    assert path.read_text() == text


def test_jora_run_refuses_a_foreign_lineage_before_any_stage(tmp_path):
    """Refused by the preflight, in one line: not after an hour of training."""
    import yaml

    from pipeline.demo import SAMPLE, TINY_MODEL, demo_settings
    from pipeline.demo_source import make_demo_source

    source = make_demo_source(SAMPLE, TINY_MODEL, tmp_path / "demo-source").out_dir
    work = tmp_path / "w"
    work.mkdir()
    (work / "lineage.json").write_text('{"team": "our own notes"}')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(demo_settings(work, source, SAMPLE).model_dump()))
    run = subprocess.run([JORA, "run", "--config", config], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [f"error: {work / 'lineage.json'}: not a lineage file jora wrote; "
                                               "refusing to overwrite it (move it away or use another workdir)"]
    assert (work / "lineage.json").read_text() == '{"team": "our own notes"}' and not (work / "store").exists()


def test_jora_run_demo_output_then_quiet(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    work = tmp_path / "w"
    run = subprocess.run([JORA, "run", "--demo", "--workdir", work], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stderr
    for name, (stage, out) in DEMO_FLOW.items():  # each stage reported once on the console, once in the summary
        assert _mentions(log, work / out) == [f"{stage}: wrote"], log
        assert len(re.findall(rf"^{name} +ran +{re.escape(str(work / out))}$", run.stdout, re.M)) == 1, run.stdout
    assert "Task run '" not in log
    assert "without a flow run id" not in log and "Warning" not in log
    progress = re.findall(r"^train: step (\d+)/(\d+) \(\d+%\), loss [\d.]+(?:, eval loss [\d.]+ \(step \d+\))?, "
                          r"\d+ tok/s(?:, ETA \d+:\d\d:\d\d)?$", log, re.M)
    assert 10 <= len(progress) <= 20 and progress[-1][0] == progress[-1][1], log
    facts = json.loads((work / "train" / "jora-manifest.json").read_text())["facts"]
    summary = (f"Training: {facts['steps']} steps, final loss {facts['final_loss']:.4f}, "
               f"eval loss {facts['eval_loss']:.4f}")
    assert summary in run.stdout.splitlines()
    assert re.search(r'^A: ".*" \(asked with its retrieved passages; the answer is ', run.stdout, re.M)
    assert re.search(r"^Golden set \(50 questions\), exact match: [\d.]+ trained, [\d.]+ trained without the "
                     r"passages, [\d.]+ for the base model$", run.stdout, re.M), run.stdout
    assert re.search(r"^Gate: new adapter published: token_f1 [\d.]+, [\d.]+ better than the base model's ",
                     run.stdout, re.M), run.stdout

    quiet = subprocess.run([JORA, "-q", "run", "--demo", "--workdir", work], capture_output=True, text=True, env=env,
                           timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-3000:]
    # all skipped; what is published holds this very adapter, so the gate scores nothing again
    assert quiet.stdout.count("skipped (up to date)") == len(DEMO_FLOW) - 1 and summary in quiet.stdout.splitlines()
    assert "evaluate-published" not in quiet.stdout and "the published model already holds it" in quiet.stdout
    runs = json.loads((work / "lineage.json").read_text())["runs"]
    assert [r["ran"] for r in runs] == [list(DEMO_FLOW), []]

    # The flow's log as Prefect's UI shows it (the temporary server's database): each stage once a run,
    # the progress lines, and under -q too (-q quiets the console only).
    api = _flow_logs(tmp_path / "prefect" / "prefect.db")
    assert len(api) == 2, api
    for name, (stage, out) in DEMO_FLOW.items():
        again = [] if name == "evaluate-base" else [f"{stage}: skipped,"]
        assert [_mentions(log, work / out) for log in api] == [[f"{stage}: wrote"], again], api
    assert len(re.findall(r"^train: step \d+/\d+ ", api[0], re.M)) == len(progress)


def _mentions(log: str, path: Path) -> list[str]:
    """What comes before `path` on each line of `log` that names it ("train: wrote")."""
    return re.findall(rf"^(.*?) ?{re.escape(str(path))}(?![\w/.-])", log, re.M)


def _flow_logs(database: Path) -> list[str]:
    """Each flow run's log in Prefect's database, oldest run first."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = db.execute("SELECT flow_run_id, message FROM log ORDER BY timestamp").fetchall()
    runs: dict[str, list[str]] = {}
    for run_id, message in rows:
        runs.setdefault(run_id, []).append(message)
    return ["\n".join(messages) for messages in runs.values()]
