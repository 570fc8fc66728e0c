"""How `jora run`, `jora tokenize` and `jora server` fail and end, through the real command line.

Bad input ends in exactly one line (no Prefect log of it, no traceback) with status 2, and what can be
checked before the flow is checked before Prefect's temporary server starts: the server, the first
thing to make PREFECT_HOME's database, has left none. Killed outright (kill -9, as the out-of-memory
killer does) or stopped with SIGTERM, a command's child processes (Prefect's servers, tokenizer
workers) end with it; SIGTERM ends in the line "stopped by SIGTERM; ..." and status 143.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.demo import SAMPLE, TINY_MODEL
from pipeline.demo_source import make_demo_source
from tests.processes import alive, assert_all_end, command_line, descendants, free_port, stop_group, wait_until

JORA = Path(sys.executable).with_name("jora")
TEMPORARY_SERVER = "prefect.server.api.server:create_app"  # in the command line of Prefect's temporary server


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_demo_source(SAMPLE, TINY_MODEL, tmp_path_factory.mktemp("src") / "demo-source").out_dir


def _config(tmp_path: Path, source: Path, **changes) -> Path:
    """A run of two steps on the demo checkpoint; `changes` maps dotted names to values."""
    raw = {"workdir": str(tmp_path / "work"), "model": {"checkpoint": str(source)},
           "data": {"path": str(SAMPLE), "max_seq_len": 512, "val_fraction": 0.1},
           "lora": {"r": 4, "alpha": 8}, "train": {"batch_size": 4, "grad_accum": 1, "max_steps": 2, "eval_every": 0},
           "export": {"verify": False}}
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        (raw[section] if section else raw)[key] = value
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # Prefect's temporary server
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect")}


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error" in line.lower()]


def _unreadable_layout(tmp_path: Path) -> Path:
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / "weights.bin").write_bytes(b"\0" * 16)
    return tmp_path / "not-a-checkpoint"


PREFLIGHT = {  # case -> (settings changed, the one line's telling part)
    "missing checkpoint": (lambda tmp: {"model.checkpoint": str(tmp / "nowhere")}, "source checkpoint not found"),
    "unrecognised checkpoint": (lambda tmp: {"model.checkpoint": str(_unreadable_layout(tmp))},
                                "neither Meta's layout"),
    "missing data file": (lambda tmp: {"data.path": str(tmp / "absent.json")}, "data file not found"),
    "data path is a directory": (lambda tmp: {"data.path": str(tmp)}, "data path is not a file"),
    "mesh larger than the machine": (lambda tmp: {"train.mesh": "model=1024"}, "needs 1024 devices"),
    "busy work directory": (lambda tmp: {}, "another jora run"),
}


@pytest.mark.parametrize("case", PREFLIGHT)
def test_bad_input_is_refused_in_one_line_before_prefect_starts(case, source, tmp_path):
    from pipeline.flow import RunLock

    changes, expected = PREFLIGHT[case]
    config = _config(tmp_path, source, **changes(tmp_path))
    with RunLock(tmp_path / "work") if case == "busy work directory" else contextlib.nullcontext():
        run = subprocess.run([JORA, "run", "--config", config], capture_output=True, text=True, env=_env(tmp_path),
                             timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    assert len(_error_lines(output)) == 1 and expected in _error_lines(output)[0], output[-3000:]
    assert "Traceback" not in output
    # Prefect's temporary server makes its database in PREFECT_HOME as it starts: none, so never started
    assert not (tmp_path / "prefect" / "prefect.db").exists() and "temporary server" not in output


def test_bad_input_found_inside_the_flow_ends_in_one_line(source, tmp_path):
    """A record without its output is found by the tokenize stage, inside the flow, after convert ran:
    Prefect logs neither the failure nor a traceback on the console, the command prints the one line."""
    records = json.loads(SAMPLE.read_text())
    del records[3]["output"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    run = subprocess.run([JORA, "run", "--config", _config(tmp_path, source, **{"data.path": str(data)})],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    assert "Beginning flow run" in output and "convert: wrote" in output  # it did fail inside the flow
    assert _error_lines(output) == [f"error: {data}: record 3: missing 'output' (use --lenient to skip bad records)"], \
        output[-3000:]
    assert "Traceback" not in output


def _start(command: list, tmp_path: Path, **kwargs) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "output.log"
    with open(log, "w") as out:  # its own group: stop_group cleans up after a failure
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path),
                                   start_new_session=True, **kwargs)
    return process, log


def _with_server(pid: int) -> dict[int, int] | None:
    """pid's descendants once Prefect's temporary server is one of them."""
    below = descendants(pid)
    return below if any(TEMPORARY_SERVER in command_line(child) for child in below) else None


def test_killed_run_leaves_no_prefect_server(source, tmp_path):
    """kill -9 in the middle of the flow (Prefect's server up, the stages running): nothing stays."""
    run, log = _start([JORA, "run", "--config", _config(tmp_path, source)], tmp_path)
    try:
        wait_until(lambda: "Beginning flow run" in log.read_text(), "the flow to start", process=run)
        below = wait_until(lambda: _with_server(run.pid), "Prefect's temporary server", process=run)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert_all_end(below)
    finally:
        stop_group(run)


def test_sigterm_before_training_ends_in_one_line_and_stops_the_server(source, tmp_path):
    """SIGTERM while Prefect's temporary server starts (before any stage, let alone training)."""
    run, log = _start([JORA, "run", "--config", _config(tmp_path, source)], tmp_path)
    try:
        below = wait_until(lambda: _with_server(run.pid), "Prefect's temporary server", process=run, poll_s=0.02)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=300) == 143, log.read_text()[-3000:]
        assert_all_end(below)
    finally:
        stop_group(run)
    output = log.read_text()  # the line, then at most Prefect's "Stopping temporary server" from its exit hook
    assert "stopped by SIGTERM; finished outputs are intact" in output.splitlines(), output[-3000:]
    assert "Traceback" not in output and not _error_lines(output)


def test_killed_tokenize_leaves_no_workers(source, tmp_path):
    records = json.loads(SAMPLE.read_text())
    data = tmp_path / "many.json"
    data.write_text(json.dumps(records[:48] * 1500))  # about 140 tasks of 512 records: the workers are busy a while
    run, _ = _start([JORA, "tokenize", data, tmp_path / "tokenized", "--tokenizer", source / "tokenizer.model",
                     "--workers", "2"], tmp_path)
    try:
        def workers():
            below = descendants(run.pid)
            spawned = [pid for pid in below if "spawn_main" in command_line(pid)]
            return below if len(spawned) == 2 else None

        below = wait_until(workers, "two tokenizer workers", process=run, poll_s=0.02)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert_all_end(below)  # the workers, and multiprocessing's resource tracker once they are gone
    finally:
        stop_group(run)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopped_server_stops_prefect(signum, tmp_path):
    port = free_port()
    server, log = _start([JORA, "server", "--port", str(port), "--no-ui"], tmp_path)
    try:
        wait_until(lambda: _healthy(port), "the Prefect server to answer", process=server, poll_s=0.5)
        below = descendants(server.pid)
        assert below  # Prefect's server, a child of `jora server`
        server.send_signal(signum)
        status = server.wait(timeout=300)
        if signum == signal.SIGTERM:  # stopped, `jora server` waits for Prefect to close before it exits
            assert not alive(below)
        assert_all_end(below)  # killed, the kernel tells Prefect (its parent-death signal)
    finally:
        stop_group(server)
    assert not _healthy(port)
    if signum == signal.SIGTERM:
        output = log.read_text()
        assert status == 143 and output.splitlines()[-1] == "stopped by SIGTERM; finished outputs are intact", \
            output[-3000:]
        assert "Traceback" not in output


def _training(pid: int, work: Path) -> dict[int, int] | None:
    """pid's descendants once the run below it has begun to train."""
    below = descendants(pid)
    started = work.is_dir() and any(p.name.startswith(".train.work-") for p in work.iterdir())
    return below if started and below else None


# What the GUI does on Launch: a page handler's thread (one of a pool, which ends when idle) starts the run.
GUI_LAUNCH = """
import sys, threading, time
from pipeline.gui.runs import LocalRun
from pipeline.settings import load_settings
runs = []
handler = threading.Thread(target=lambda: runs.append(LocalRun(load_settings(sys.argv[1]))))
handler.start()
handler.join()
time.sleep(3600)
"""


def test_killed_gui_stops_its_run(source, tmp_path):
    """kill -9 of the GUI's process while a run it launched trains: the run and everything below it end.
    The handler thread that launched it ended long before training began, and the run lived on."""
    # a run of hours: had it outlived the GUI, it would still be running when assert_all_end gives up
    config = _config(tmp_path, source, **{"train.max_steps": 10 ** 6, "train.epochs": 10 ** 5})
    gui, _ = _start([sys.executable, "-c", GUI_LAUNCH, config], tmp_path, cwd=Path(__file__).parents[1])
    try:
        below = wait_until(lambda: _training(gui.pid, tmp_path / "work"), "the launched run to train", process=gui)
        gui.send_signal(signal.SIGKILL)
        gui.wait()
        assert_all_end(below)
    finally:
        stop_group(gui)
