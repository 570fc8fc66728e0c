"""`jora train` as a user meets it: outputs, skip, kill-and-resume, warm start, and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from stages.base import MANIFEST
from tests.test_convert_stage import assert_clean_failure, file_identities
from tests.train_helpers import tiny_data, tiny_store

JORA = Path(sys.executable).with_name("jora")
COMMON = ["--lora-r", "4", "--lora-alpha", "8", "--batch-size", "2", "--grad-accum", "2", "--max-seq-len", "256",
          "--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "1", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("train")
    _, store = tiny_store(root, tokenizer_model)
    return root, store, tiny_data(root, tokenizer_model)


def _train(store, data, out, *extra):
    return [str(JORA), "train", "--model", str(store), "--data", str(data), str(out), *COMMON, *extra]


def test_train_writes_everything_and_skips_when_done(inputs, tmp_path):
    root, store, data = inputs
    out = tmp_path / "run"
    first = subprocess.run(_train(store, data, out), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "trained:" in first.stdout and "eval loss" in first.stdout
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "adapter" / "adapter.json").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    assert ["eval_loss" in r for r in records] == [False, False, True, False, False, True]
    assert all(r["eval_perplexity"] > 1 for r in records if "eval_loss" in r)
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    store_manifest = json.loads((store / "jora-manifest.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["base_hash"] == f"{store_manifest['key']}.{store_manifest['build']}"
    assert not list(tmp_path.glob(".run.work-*"))  # the work directory became the output
    before, manifest = file_identities(out), (out / MANIFEST).read_bytes()
    second = subprocess.run(_train(store, data, out), capture_output=True, text=True)
    assert second.returncode == 0 and "skipped" in second.stdout, second.stderr
    assert "trained:" not in second.stdout  # no training ran ...
    assert file_identities(out) == before and (out / MANIFEST).read_bytes() == manifest  # ... nothing was rewritten
    assert not list(tmp_path.glob(".run.*"))  # ... and no work directory was made
    # the key holds the kernel set "auto" resolved to (cpu here), so naming it is the same run
    assert json.loads(manifest)["settings"]["kernels"] == "cpu"
    named = subprocess.run(_train(store, data, out, "--kernels", "cpu"), capture_output=True, text=True)
    assert named.returncode == 0 and "skipped" in named.stdout, named.stderr


def test_kill_and_resume_gives_a_bitwise_identical_adapter(inputs, tmp_path):
    root, store, data = inputs
    reference = tmp_path / "uninterrupted"
    assert subprocess.run(_train(store, data, reference), capture_output=True).returncode == 0

    out = tmp_path / "killed"
    process = subprocess.Popen(_train(store, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # any checkpoint of step 3 or later: only the newest three are kept, so step 3's own is deleted at
    # step 6, and a poll that missed it would otherwise see the run finish instead
    while not [c for c in tmp_path.glob(".killed.work-*/checkpoints/ckpt-*") if int(c.name[5:]) >= 3]:
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()  # nothing half-finished was taken for output
    resumed = subprocess.run(_train(store, data, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stderr
    facts = json.loads((out / "jora-manifest.json").read_text())["facts"]
    assert facts["resumed_from"] >= 3
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter.safetensors").read_bytes()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated lines from the killed run


def test_sigterm_stops_at_the_next_step_with_a_resumable_checkpoint(inputs, tmp_path):
    """What a cancelled Prefect run does: SIGTERM; training stops after the step in flight, writes a
    checkpoint there, and the same command resumes to the uninterrupted result."""
    root, store, data = inputs
    reference = tmp_path / "reference"
    assert subprocess.run(_train(store, data, reference, "--checkpoint-every", "50"),
                          capture_output=True).returncode == 0
    out = tmp_path / "cancelled"
    process = subprocess.Popen(_train(store, data, out, "--checkpoint-every", "50"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = None
    while not (metrics and metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline
        found = list(tmp_path.glob(".cancelled.work-*/metrics.jsonl"))
        metrics = found[0] if found else None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "stopped by SIGTERM at step" in stderr, stderr
    assert list(metrics.parent.glob("checkpoints/ckpt-*"))
    resumed = subprocess.run(_train(store, data, out, "--checkpoint-every", "50"), capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming from step" in resumed.stderr
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter.safetensors").read_bytes()


def test_warm_start_from_an_earlier_adapter(inputs, tmp_path, tokenizer_model):
    """--init-adapter starts from the earlier adapter: with a vanishing learning rate the new adapter is
    the old one; a cold start from the same data begins with B = 0 and a higher loss."""
    import numpy as np
    from safetensors.numpy import load_file

    root, store, data = inputs
    first = tmp_path / "first"
    assert subprocess.run(_train(store, data, first, "--lr", "1e-2"), capture_output=True).returncode == 0
    newer = tiny_data(root, tokenizer_model, n=16, seed=7)  # the refreshed retrieved context
    warm = tmp_path / "warm"
    result = subprocess.run(_train(store, newer, warm, "--init-adapter", str(first), "--lr", "1e-12"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before = load_file(first / "adapter" / "adapter.safetensors")
    after = load_file(warm / "adapter" / "adapter.safetensors")
    assert before.keys() == after.keys()
    assert max(float(np.abs(before[k] - after[k]).max()) for k in before) < 1e-6
    assert max(float(np.abs(before[k]).max()) for k in before if k.endswith("lora_b")) > 1e-3
    cold = tmp_path / "cold"
    assert subprocess.run(_train(store, newer, cold, "--lr", "1e-12"), capture_output=True).returncode == 0
    first_step = [json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["loss"] for d in (warm, cold)]
    assert first_step[0] < first_step[1]
    bad = subprocess.run(_train(store, newer, tmp_path / "bad", "--init-adapter", str(first), "--lora-r", "8"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "r=4" in bad.stderr


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_bad_paths_mesh_and_length(inputs, tmp_path):
    root, store, data = inputs
    common = COMMON
    assert_clean_failure(_invoke("train", "--model", tmp_path / "nope", "--data", data, tmp_path / "o", *common),
                         "parameter store not found")
    assert_clean_failure(_invoke("train", "--model", data, "--data", data, tmp_path / "o", *common),
                         "not a jora parameter store")
    assert_clean_failure(_invoke("train", "--model", store, "--data", tmp_path / "nope", tmp_path / "o", *common),
                         "tokenized data directory not found")
    assert_clean_failure(_invoke("train", "--model", store, "--data", data, tmp_path / "o", *common,
                                 "--mesh", "model=3"), "model=3 does not divide")
    assert_clean_failure(_invoke("train", "--model", store, "--data", data, tmp_path / "o", *common,
                                 "--mesh", "data=2,model=1"), "needs 2 devices")
    assert_clean_failure(_invoke("train", "--model", store, "--data", data, tmp_path / "o", *common[:-8],
                                 "--max-seq-len", "100000", "--max-steps", "2"), "longer than the model allows")
    assert_clean_failure(_invoke("train", "--model", store, "--data", data, tmp_path / "o", *common[:-8],
                                 "--max-seq-len", "64", "--max-steps", "2"), "more than max_seq_len")
    assert not (tmp_path / "o").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(inputs, tmp_path, monkeypatch):
    """The step is made to report NaN from step 4 on (a diverging run); the trainer must stop with one
    line, exit 2, and leave the checkpoints of steps 1-2 to resume from: step 4's loss was computed on
    the weights step 3 left, so step 3's checkpoint may hold the update that blew up (tests/test_divergence.py)."""
    import dataclasses

    import jax.numpy as jnp

    import jora_model.training.step as train_module

    real = train_module.make_step_functions

    def diverging(*args, **kwargs):
        fns = real(*args, **kwargs)

        def train_step(state, frozen, batch):
            state, metrics = fns.train_step(state, frozen, batch)
            if int(state.step) >= 4:
                metrics = metrics._replace(loss=jnp.float32(float("nan")))
            return state, metrics

        return dataclasses.replace(fns, train_step=train_step)

    monkeypatch.setattr(train_module, "make_step_functions", diverging)
    root, store, data = inputs
    out = tmp_path / "nan"
    result = _invoke("train", "--model", store, "--data", data, out, *COMMON)
    assert_clean_failure(result, "loss became nan at step 4", "last good checkpoint (step 2)",
                         "those of step 3 on are removed")
    work = list(tmp_path.glob(".nan.work-*"))
    assert len(work) == 1 and not out.exists()
    assert sorted(p.name for p in (work[0] / "checkpoints").glob("ckpt-*")) == \
        ["ckpt-00000001", "ckpt-00000002"]
