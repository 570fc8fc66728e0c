"""The `jora` entry's re-execution with glibc's huge-page tunable (pipeline/launch.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.launch import TUNABLE, huge_page_environment

REPO = Path(__file__).resolve().parents[1]
MADVISE = "always [madvise] never\n"


def test_the_environment_gains_the_tunable_once_and_only_where_it_can_work():
    env = huge_page_environment({"PATH": "/bin"}, MADVISE, "glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    assert huge_page_environment(env, MADVISE, "glibc") is None  # already set: no second exec
    kept = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "[always] madvise never", "glibc")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + TUNABLE  # the user's tunables stay
    assert huge_page_environment({}, "always madvise [never]", "glibc") is None  # the kernel said never
    assert huge_page_environment({}, MADVISE, "") is None  # musl and others: no glibc tunables
    assert huge_page_environment({"JORA_HUGE_PAGES": "0"}, MADVISE, "glibc") is None  # opted out


def _probe(extra_env: dict[str, str]) -> list[str]:
    code = ("import os; from pipeline.launch import reexecute_with_huge_pages; "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); reexecute_with_huge_pages(); "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JORA_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, **extra_env}, capture_output=True,
                         text=True, check=True, timeout=60)
    return out.stdout.splitlines()


def test_the_process_reexecutes_itself_with_the_tunable():
    expected = huge_page_environment({})  # this machine's answer: None where glibc or the kernel rule it out
    lines = _probe({})
    if expected is None:
        assert lines[-1].split()[1] == "None" and len(lines) == 2
    else:
        # the first print, then the same pid (exec keeps it) printing again after the re-execution
        assert len(lines) == 3 and lines[0].split()[1] == "None"
        assert lines[1] == lines[2] == f"{lines[0].split()[0]} {TUNABLE}"
    assert _probe({"JORA_HUGE_PAGES": "0"})[-1].split()[1] == "None"


def test_a_child_started_with_child_dies_with_us_ends_when_its_parent_is_killed():
    """kill -9 of the parent (no cleanup runs in it): the kernel's parent-death signal ends the child."""
    from tests.processes import assert_all_end, descendants

    code = ("import os, signal, subprocess, sys; from stages.children import child_dies_with_us; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], stdout=subprocess.DEVNULL, "
            "preexec_fn=child_dies_with_us()); "
            "print('started', flush=True); sys.stdin.readline(); os.kill(os.getpid(), signal.SIGKILL)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout.readline() == "started\n"
    child = descendants(parent.pid)
    assert len(child) == 1
    parent.communicate("go\n", timeout=60)
    assert parent.returncode == -signal.SIGKILL
    assert_all_end(child)
