"""Multi-host training on JAX's distributed runtime, on one machine: two `jora train` processes on
127.0.0.1, each with 2 virtual CPU devices (gloo collectives between them), over one 4-device mesh.

The reference is one process with 4 devices and the same mesh (data=2, model=2), so both runs do the
same arithmetic split the same way; fp32 losses must agree to 1e-4 relative (a sharding or row-order
mistake moves the loss by far more; gloo's sums may differ from XLA's in-process ones by ~1e-7).
Every subprocess has a timeout, so a hang fails the test instead of stalling CI. The runs share a
JAX compilation cache (compiling dominates these tiny runs): the first two-process run compiles, the
later ones (rerun, killed, resumed) reuse its executables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train_helpers import tiny_data, tiny_store
from tests.processes import free_port

JORA = Path(sys.executable).with_name("jora")
STEPS = 8
COMMON = ["--lora-r", "4", "--lora-alpha", "8", "--targets", "q_proj,v_proj,o_proj,down_proj", "--batch-size", "2",
          "--grad-accum", "2", "--max-seq-len", "256", "--max-steps", str(STEPS), "--eval-every", "4",
          "--checkpoint-every", "1", "--lr", "1e-3", "--compute-dtype", "float32", "--remat", "none",
          "--mesh", "data=2,model=2", "--heartbeat-timeout", "10"]
RUN_TIMEOUT = 300  # seconds for one run (two processes) on two loaded cores; ~50 s is usual
EXIT_BOUND = 10 + 30  # after a peer dies: the heartbeat timeout plus slack for a loaded machine


def _env(devices: int, cache: Path) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


class Pair:
    """Two `jora train` processes of one run; their output goes to files (pipes could fill and block)."""

    def __init__(self, store: Path, data: Path, out: Path, logs: Path):
        port = free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [(logs / f"p{i}.out", logs / f"p{i}.err") for i in range(2)]
        self.procs = []
        for i, (out_log, err_log) in enumerate(self.logs):
            cmd = [str(JORA), "train", "--model", str(store), "--data", str(data), str(out), *COMMON,
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            with open(out_log, "w") as o, open(err_log, "w") as e:
                self.procs.append(subprocess.Popen(cmd, stdout=o, stderr=e, env=_env(2, out.parent / "jax-cache")))

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"a multi-host run took over {timeout} s: {self.stderr(0)[-2000:]}\n{self.stderr(1)[-2000:]}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def stdout(self, i: int) -> str:
        return self.logs[i][0].read_text()

    def stderr(self, i: int) -> str:
        return self.logs[i][1].read_text()


def _single(store, data, out) -> subprocess.CompletedProcess:
    cmd = [str(JORA), "train", "--model", str(store), "--data", str(data), str(out), *COMMON]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(4, Path(out).parent / "jax-cache"),
                          timeout=RUN_TIMEOUT)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("multihost")
    _, store = tiny_store(root, tokenizer_model)
    return root, store, tiny_data(root, tokenizer_model, n=20)


@pytest.fixture(scope="module")
def runs(inputs):
    root, store, data = inputs
    single = _single(store, data, root / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    pair = Pair(store, data, root / "multi", root / "logs-multi")
    try:
        codes = pair.wait()
    finally:
        pair.kill()
    assert codes == [0, 0], (pair.stderr(0)[-3000:], pair.stderr(1)[-3000:])
    return root, store, data, pair


def test_two_processes_train_like_one_process_with_four_devices(runs):
    root, _, _, pair = runs
    one, two = root / "single", root / "multi"
    ref, ours = _metrics(one), _metrics(two)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # written once, by process 0
    for a, b in zip(ours, ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), ([r["loss"] for r in ours], [r["loss"] for r in ref])
        assert ("eval_loss" in a) == ("eval_loss" in b)
        if "eval_loss" in a:
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-4 * abs(b["eval_loss"])
    assert ours[0]["loss"] != ours[-1]["loss"]  # it trained
    for i in range(2):
        assert f"process {i} of 2 joined the run" in pair.stderr(i)
        assert "trained:" in pair.stdout(i) and "(8 steps" in pair.stdout(i)
    # Same inputs -> same stage key, whatever the process count; one finished output, no leftovers.
    key = json.loads((one / "jora-manifest.json").read_text())["key"]
    manifest = json.loads((two / "jora-manifest.json").read_text())
    assert manifest["key"] == key and manifest["facts"]["steps"] == STEPS
    assert not [p for p in two.rglob(".lock*")] and not list(root.glob(".multi.*"))
    assert (two / "adapter" / "adapter.safetensors").is_file() and (two / "loss.png").is_file()


def test_a_rerun_skips_on_every_process(runs):
    root, store, data, _ = runs
    before = (root / "multi" / "jora-manifest.json").read_text()
    pair = Pair(store, data, root / "multi", root / "logs-skip")
    try:
        assert pair.wait() == [0, 0], pair.stderr(0)[-2000:]
    finally:
        pair.kill()
    assert all("skipped" in pair.stdout(i) for i in range(2))
    assert (root / "multi" / "jora-manifest.json").read_text() == before


def test_a_killed_process_stops_the_other_and_a_restart_resumes(runs):
    root, store, data, _ = runs
    out = root / "killed"
    pair = Pair(store, data, out, root / "logs-kill")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not list(root.glob(".killed.work-*/checkpoints/ckpt-00000002")):
            assert all(p.poll() is None for p in pair.procs), (pair.stderr(0)[-2000:], pair.stderr(1)[-2000:])
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        pair.procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = pair.procs[0].wait(timeout=EXIT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {EXIT_BOUND} s after its peer was killed")
        took = time.monotonic() - killed
    finally:
        pair.kill()
    assert code == 2, pair.stderr(0)[-3000:]
    last = pair.stderr(0).strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2 lost contact with the others") and "resume" in last, last
    assert not out.exists()  # nothing half-finished was taken for the output
    print(f"process 0 exited {took:.1f} s after process 1 was killed")

    again = Pair(store, data, out, root / "logs-resume")
    try:
        assert again.wait() == [0, 0], (again.stderr(0)[-3000:], again.stderr(1)[-3000:])
    finally:
        again.kill()
    resumed = json.loads((out / "jora-manifest.json").read_text())["facts"]["resumed_from"]
    assert resumed >= 2 and all(f"resuming from step {resumed}" in again.stderr(i) for i in range(2))
    # Bitwise the state of the uninterrupted two-process run: same adapter, same losses, no duplicates.
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == \
        (root / "multi" / "adapter" / "adapter.safetensors").read_bytes()
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(root / "multi")]


def test_reader_rows_split_each_batch_between_processes(inputs):
    """Each process reads only its rows of a global batch, padded to the whole batch's length."""
    import numpy as np

    from jora_model.data.shards import BatchReader, BatchSettings

    _, _, data = inputs
    settings = BatchSettings(batch_size=4, seed=3, pad_multiple=8)
    whole = BatchReader(data / "train", settings)
    first_half = BatchReader(data / "train", settings, rows=slice(0, 2))
    second_half = BatchReader(data / "train", settings, rows=slice(2, 4))
    for batch, first, second in zip(_take(whole, 5), _take(first_half, 5), _take(second_half, 5)):
        for name in ("input_ids", "loss_mask", "segment_ids"):
            np.testing.assert_array_equal(np.concatenate([getattr(first, name), getattr(second, name)]),
                                          getattr(batch, name))
        assert first.tokens == second.tokens == batch.tokens == int((batch.segment_ids > 0).sum())
        assert first.example_ids + second.example_ids == batch.example_ids


def _take(reader, n):
    iterator = iter(reader)
    return [next(iterator) for _ in range(n)]


def test_partial_multihost_flags_are_one_line_errors(inputs):
    from click.testing import CliRunner

    from pipeline.cli import cli

    root, store, data = inputs
    result = CliRunner().invoke(cli, ["train", "--model", str(store), "--data", str(data), str(root / "x"),
                                      "--coordinator", "127.0.0.1:1234", "--num-processes", "2"])
    assert result.exit_code == 2 and "needs all of --coordinator" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (root / "x").exists()


def test_no_coordinator_is_one_line_after_the_join_timeout():
    """A process that cannot reach process 0 says so (JAX itself would abort with a C++ fatal error)."""
    code = ("from jora_model.parallel.distributed import DistributedSettings, initialize\n"
            f"initialize(DistributedSettings('127.0.0.1:{free_port()}', 2, 1, init_timeout_s=2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "JoraError: no coordinator answered at 127.0.0.1:" in out.stderr, out.stderr


def test_distributed_settings_need_all_three_flags_and_sane_values():
    from jora_model.parallel.distributed import DistributedSettings, cluster_detected
    from jora_model.errors import JoraError

    with pytest.raises(JoraError, match="needs all of --coordinator"):
        DistributedSettings(coordinator="10.0.0.1:1234")
    with pytest.raises(JoraError, match="HOST:PORT"):
        DistributedSettings(coordinator="10.0.0.1", num_processes=2, process_id=0)
    with pytest.raises(JoraError, match="process-id must be in 0..1"):
        DistributedSettings(coordinator="node1:1234", num_processes=2, process_id=2)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    assert cluster_detected(slurm) == "slurm"
    assert cluster_detected({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: a plain single process
    assert cluster_detected({}) is None
