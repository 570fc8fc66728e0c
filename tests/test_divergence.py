"""A dead or diverging model is not a finished run: `jora train` stops with one line, exit 2, publishes
nothing, and keeps the newest checkpoint from before the step that broke the weights (a step's metrics
are computed on the weights the step before it left), which a rerun resumes from."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import numpy as np
import pytest
from click.testing import CliRunner

from jora_model.training.checkpoint import checkpoint_step, list_checkpoints, prune_checkpoints, save_checkpoint
from jora_model.training.stop import LOSS_WINDOW, ZERO_GRAD_STEPS, DivergenceWatch
from pipeline.cli import cli
from stages.base import MANIFEST
from tests.test_convert_stage import assert_clean_failure, file_identities
from tests.train_helpers import tiny_data, tiny_store

VOCAB = 320  # the tiny store's vocabulary: uniform guessing costs ln(320) = 5.7683 nats a token


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("divergence")
    _, store = tiny_store(root, tokenizer_model)
    return store, tiny_data(root, tokenizer_model)


def _train(inputs, out, steps: int, lr: str = "1e-3", *extra):
    store, data = inputs
    args = ["train", "--model", store, "--data", data, out, "--lora-r", "4", "--lora-alpha", "8", "--batch-size", "2",
            "--grad-accum", "2", "--max-seq-len", "256", "--epochs", "50", "--max-steps", str(steps),
            "--eval-every", "0", "--checkpoint-every", "1", "--lr", lr, *extra]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _doctor(monkeypatch, change):
    """Make the train step report change(step, metrics) instead of its metrics (its state is untouched)."""
    import jora_model.training.step as step_module

    real = step_module.make_step_functions

    def doctored(*args, **kwargs):
        fns = real(*args, **kwargs)

        def train_step(state, frozen, batch):
            state, metrics = fns.train_step(state, frozen, batch)
            return state, change(int(state.step), metrics)

        return dataclasses.replace(fns, train_step=train_step)

    monkeypatch.setattr(step_module, "make_step_functions", doctored)


def _checkpoint_steps(tmp_path, name: str) -> list[int]:
    work = list(tmp_path.glob(f".{name}.work-*"))
    assert len(work) == 1
    return [checkpoint_step(p) for p in list_checkpoints(work[0] / "checkpoints")]


def _records(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _error_line(result) -> str:
    return result.stderr.strip()


def _resumed_and_failed(result, step: int, *fragments: str) -> None:
    """assert_clean_failure for a resumed run, whose stderr also has the log line that says so."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith(f"train: resuming from step {step} "), result.stderr
    assert lines[1].startswith("error: ") and all(f in lines[1] for f in fragments), (fragments, lines[1])


def test_lr_1e8_kills_the_model_and_the_run_fails_without_replacing_the_published_adapter(inputs, tmp_path):
    """The issue's run: at lr 1e8 the loss sticks at ln(vocab) with a gradient norm of exactly 0. It used
    to exit 0 and publish the dead adapter; now it stops three zero-gradient steps in, the adapter an
    earlier healthy run published into OUT stays as it was, and the checkpoint from two steps before the
    first zero (the last weights a step was seen to work on) is what is left."""
    out = tmp_path / "run"
    healthy = _train(inputs, out, 6)
    assert healthy.exit_code == 0, healthy.output
    before, manifest = file_identities(out), (out / MANIFEST).read_bytes()

    dead = _train(inputs, out, 12, "1e8")
    assert_clean_failure(dead, "the gradient norm was exactly 0 at steps", "uniform guessing gives 5.7683",
                         "the model is dead", "Try a lower --lr")
    line = _error_line(dead)
    first, fired = map(int, re.search(r"exactly 0 at steps (\d+)-(\d+)", line).groups())
    assert fired == first + ZERO_GRAD_STEPS - 1
    assert f"the last good checkpoint (step {first - 2}) is kept" in line
    assert f"those of step {first - 1} on are removed" in line
    assert file_identities(out) == before and (out / MANIFEST).read_bytes() == manifest  # nothing published
    steps = _checkpoint_steps(tmp_path, "run")
    assert steps and max(steps) == first - 2  # a rerun resumes before the weights the zeros came from
    records = {r["step"]: r for r in _records(next(tmp_path.glob(".run.work-*")))}
    assert all(records[s]["grad_norm"] == 0.0 for s in range(first, fired))  # the fired step was not logged
    assert records[first - 1]["grad_norm"] > 0 and abs(records[first]["loss"] - math.log(VOCAB)) < 1e-3


def test_a_nan_keeps_the_checkpoint_before_the_step_that_broke_the_weights_and_the_rerun_resumes_there(
        inputs, tmp_path, monkeypatch):
    """NaN from step 6 on: step 6's loss was computed on the weights step 5's update left, so the
    checkpoint of step 5 is removed and step 4's kept. Rerun (the step healthy again), the same command
    resumes from step 4 and ends with the adapter of a run that never went wrong, bit for bit."""
    reference = tmp_path / "reference"
    assert _train(inputs, reference, 8).exit_code == 0

    _doctor(monkeypatch, lambda step, m: m._replace(loss=np.float32("nan")) if step >= 6 else m)
    out = tmp_path / "nan"
    failed = _train(inputs, out, 8)
    assert_clean_failure(failed, "loss became nan at step 6", "the last good checkpoint (step 4) is kept",
                         "those of step 5 on are removed, as step 6's metrics", "Try a lower --lr.")
    assert "--no-divergence-check" not in _error_line(failed)  # a NaN is not a judgement call
    assert not out.exists() and _checkpoint_steps(tmp_path, "nan") == [1, 2, 3, 4]

    monkeypatch.undo()
    rerun = _train(inputs, out, 8)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((out / MANIFEST).read_text())["facts"]["resumed_from"] == 4
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter.safetensors").read_bytes()
    assert [r["step"] for r in _records(out)] == list(range(1, 9))
    assert [r["loss"] for r in _records(out)] == [r["loss"] for r in _records(reference)]
    assert len(list_checkpoints(out / "checkpoints")) == 3  # a finished run keeps keep_checkpoints


def test_a_loss_far_above_its_start_stops_the_run_and_a_resumed_run_judges_it_alike(inputs, tmp_path, monkeypatch):
    """The loss is made to read 3 nats higher from step 8 on, and the first run is cut short by a NaN
    at step 12. The rerun resumes from step 10 with what the checks had seen by then (the start is
    steps 1-10), so it stops where an uninterrupted run would: at step 17, the tenth high step, keeping
    step 6's checkpoint. --no-divergence-check lets the same run resume from there, finish and publish."""
    def higher(step, m):
        return m._replace(loss=m.loss + 3.0) if step >= 8 else m

    _doctor(monkeypatch, lambda step, m: m._replace(loss=np.float32("nan")) if step == 12 else higher(step, m))
    out = tmp_path / "high"
    assert_clean_failure(_train(inputs, out, 20), "loss became nan at step 12",
                         "the last good checkpoint (step 10) is kept")

    monkeypatch.undo()
    _doctor(monkeypatch, higher)
    resumed = _train(inputs, out, 20)
    _resumed_and_failed(resumed, 10, "the loss stayed more than 1 nat above the run's start",
                         "the mean of steps 1-10) at steps 8-17", "the last good checkpoint (step 6) is kept",
                         "Try a lower --lr (or --no-divergence-check if the run is fine).")
    assert not out.exists() and max(_checkpoint_steps(tmp_path, "high")) == 6

    unchecked = _train(inputs, out, 20, "1e-3", "--no-divergence-check")
    assert unchecked.exit_code == 0, unchecked.output
    # the check is not part of the cache key (it never changes the adapter): the same run goes on
    assert "train: resuming from step 6 " in unchecked.stderr, unchecked.stderr
    assert (out / "adapter" / "adapter.safetensors").is_file()


# --- the checks and the checkpoint rule, on their own ---------------------------------------------------
def _feed(watch: DivergenceWatch, metrics, start: int = 1):
    """The first finding as (its onset, the step that fired it, what), or None."""
    for step, (loss, grad_norm) in enumerate(metrics, start):
        found = watch.see(step, loss, grad_norm)
        if found:
            return found.onset, step, found.what
    return None


def test_a_healthy_noisy_run_is_never_flagged():
    """Single-row batches: the loss jumps by most of a nat from step to step, one batch in ten is far
    harder (4 nats more: rows in another language, say), and it falls slowly. Hundreds of losses lie
    more than a nat above the start, and many ten-step means too, but never ten losses in a row."""
    rng = random.Random(0)
    metrics = [(max(0.05, 3.0 - s / 20000 + rng.gauss(0, 0.8) + 4.0 * (rng.random() < 0.1)), rng.uniform(0.1, 5.0))
               for s in range(5000)]
    watch = DivergenceWatch()
    assert _feed(watch, metrics) is None
    start = watch.history()["start"][0]
    assert sum(loss > start + 1 for loss, _ in metrics) > 300
    # a gradient of exactly 0 at a loss of ~0 is a model with nothing left to learn, or a step without tokens
    assert _feed(DivergenceWatch(), [(2.0, 1.0)] * 5 + [(0.0, 0.0)] * 20) is None
    # two zero-gradient steps, then a live one: not yet a dead model
    assert _feed(DivergenceWatch(), [(2.0, 1.0), (5.7, 0.0), (5.7, 0.0), (5.7, 0.1)] * 10) is None


def test_each_check_names_its_onset():
    assert _feed(DivergenceWatch(), [(2.0, 1.0)] * 4 + [(float("nan"), 1.0)])[:2] == (5, 5)
    assert _feed(DivergenceWatch(checks=False), [(2.0, 1.0), (2.0, float("inf"))]) == \
        (2, 2, "gradient norm became inf at step 2")
    assert _feed(DivergenceWatch(vocab_size=VOCAB), [(6.0, 1.0)] * 5 + [(5.7683, 0.0)] * 5) == \
        (6, 8, "the gradient norm was exactly 0 at steps 6-8 with the loss at 5.7683, uniform guessing gives "
                "5.7683: the model is dead")
    assert _feed(DivergenceWatch(checks=False), [(6.0, 1.0)] * 5 + [(5.7683, 0.0)] * 50) is None
    risen = [(2.0, 1.0)] * 12 + [(3.5, 1.0)] * 9 + [(2.0, 1.0)] + [(3.5, 1.0)] * LOSS_WINDOW
    onset, fired, what = _feed(DivergenceWatch(), risen)
    assert (onset, fired) == (23, 22 + LOSS_WINDOW) and "(2.0000, the mean of steps 1-10)" in what


def test_a_watch_restored_from_a_checkpoint_decides_as_one_never_interrupted():
    rng = random.Random(1)
    metrics = ([(3.0 + rng.gauss(0, 0.2), 1.0) for _ in range(14)] + [(4.5, 1.0)] * 12
               + [(4.5, 0.0)] * 4)
    whole = _feed(DivergenceWatch(), metrics)
    assert whole[:2] == (15, 24)
    for cut in range(1, 24):
        first = DivergenceWatch()
        assert _feed(first, metrics[:cut]) is None
        history = json.loads(json.dumps(first.history()))  # as state.json holds it
        assert _feed(DivergenceWatch(history=history), metrics[cut:], start=cut + 1) == whole, cut
    vanished = [(3.0, 1.0)] * 5 + [(4.5, 0.0)] * 3
    first = DivergenceWatch()
    _feed(first, vanished[:6])
    assert _feed(DivergenceWatch(history=first.history()), vanished[6:], start=7)[:2] == (6, 8)


def test_checkpoints_a_later_finding_may_condemn_are_kept_until_it_cannot(tmp_path):
    """Every checkpoint newer than the settled step stays, and the newest at or before it: whatever a
    later check condemns, the newest checkpoint older than its onset is still there."""
    state = {"w": np.zeros(2, np.float32)}
    for step in range(1, 16):
        save_checkpoint(tmp_path, state, {"step": step}, keep=3, settled=step - LOSS_WINDOW)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == list(range(5, 16))
    save_checkpoint(tmp_path, state, {"step": 16}, keep=3, settled=16 - 1)  # the checks off: NaN alone
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [14, 15, 16]
    prune_checkpoints(tmp_path, keep=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [15, 16]
