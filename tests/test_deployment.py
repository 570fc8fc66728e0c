"""A scheduled deployment, end to end: a local Prefect server on 127.0.0.1, `jora deploy` serving the
flow with a cron schedule, a run triggered with `prefect deployment run ... --watch`, and every
process stopped afterwards; `jora deploy` killed outright takes its flow run with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from pipeline.demo import SAMPLE, TINY_MODEL
from pipeline.demo_source import make_demo_source
from tests.processes import assert_all_end, descendants, free_port, stop_group, wait_until

BIN = Path(sys.executable).parent


def _wait_healthy(url: str, process, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the Prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the Prefect server did not become healthy")


def _killed_runner_stops_its_run(served: subprocess.Popen, env: dict, work: Path) -> None:
    """kill -9 of `jora deploy` while a flow run it started trains: the run (a child process Prefect's
    runner spawned) and everything below it end too. The run would take hours: had it outlived the
    runner, it would still be running when assert_all_end gives up."""
    subprocess.run([BIN / "prefect", "deployment", "run", "finetune/nightly", "--param",
                    'overrides={"train.max_steps": 1000000, "train.epochs": 100000}'], env=env, capture_output=True, text=True, timeout=120,
                   check=True)

    def training():  # the flow run's process tree, once its train stage has begun
        below = descendants(served.pid)
        started = any(p.name.startswith(".train.work-") for p in work.iterdir())
        return below if started and below else None

    below = wait_until(training, "the second run to train", process=served)
    served.send_signal(signal.SIGKILL)
    served.wait()
    assert_all_end(below)


def test_served_deployment_runs_on_trigger(tmp_path):
    source = make_demo_source(SAMPLE, TINY_MODEL, tmp_path / "demo-source").out_dir
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": "work", "model": {"checkpoint": str(source)},
        "data": {"path": str(SAMPLE), "max_seq_len": 512, "val_fraction": 0.1},
        "lora": {"r": 4, "alpha": 8}, "train": {"batch_size": 4, "grad_accum": 1, "max_steps": 2, "eval_every": 0},
        "export": {"verify": False}}))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([BIN / "jora", "server", "--port", str(port), "--no-ui"], env=env,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    served = None
    try:
        _wait_healthy(api, server)
        served = subprocess.Popen([BIN / "jora", "deploy", "--name", "nightly", "--cron", "0 3 * * *", "--config",
                                   config], env=env, stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 60
        while True:  # the deployment exists once `prefect deployment inspect` finds it
            found = subprocess.run([BIN / "prefect", "deployment", "inspect", "finetune/nightly"], env=env,
                                   capture_output=True, text=True)
            if found.returncode == 0:
                break
            assert served.poll() is None, (logs / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the deployment never appeared"
            time.sleep(1)
        assert "0 3 * * *" in found.stdout  # served with its cron schedule
        run = subprocess.run([BIN / "prefect", "deployment", "run", "finetune/nightly", "--watch",
                              "--param", 'overrides={"train.max_steps": 1}'], env=env, capture_output=True,
                             text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-2000:] + (logs / "serve.log").read_text()[-3000:]
        work = tmp_path / "work"
        assert (work / "hf-model" / "config.json").is_file() and (work / "peft-adapter" / "adapter_config.json").is_file()
        assert '"steps": 1' in (work / "train" / "jora-manifest.json").read_text()  # the --param override applied
        _killed_runner_stops_its_run(served, env, work)
    finally:
        if served is not None:
            stop_group(served)
        stop_group(server)
    assert server.poll() is not None and (served is None or served.poll() is not None)
