"""Child processes the tests start in their own process group (servers and the jobs they spawn), and
the process tree below one (read from /proc) to check that nothing outlives its parent."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the child's whole group, then SIGKILL it if it has not gone within 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS has just handed out (and that nothing holds now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the process tree, read from /proc (Linux) -------------------------------------------------------

def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state letter, start time in clock ticks) of a live process, or None."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def command_line(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> dict[int, int]:
    """Every live process below `pid` (children, theirs, ...), as pid -> start time (which tells a
    process from a later one that reuses its pid)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[1] != "Z":
            parents[int(entry)] = (stat[0], stat[2])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, started) in parents.items():
            if ppid == parent and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def marked(mark: str) -> dict[int, str]:
    """The live processes whose environment holds `mark` ("NAME=VALUE"), with their command lines.
    Children inherit the environment whatever their parent or session, so one that escaped its parent's
    death (adopted by init, or started in its own session) is still found."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environment = open(f"/proc/{entry}/environ", "rb").read()
        except OSError:
            continue
        stat = _stat(int(entry))
        if mark.encode() in environment and stat is not None and stat[1] != "Z":
            found[int(entry)] = command_line(int(entry))
    return found


def alive(processes: dict[int, int]) -> dict[int, str]:
    """Those of `processes` (pid -> start time) still running, with their command lines; a zombie
    (dead, not yet reaped by whoever adopted it) counts as gone."""
    out = {}
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[1] != "Z" and stat[2] == started:
            out[pid] = command_line(pid)
    return out


def wait_until(condition, what: str, limit_s: float = 300, process: subprocess.Popen | None = None,
               poll_s: float = 0.1):
    """Poll `condition()` until it returns something true and return that. `limit_s` is a generous
    bound on a hang, not a measurement; `process` dying first fails at once."""
    deadline = time.monotonic() + limit_s
    while True:
        result = condition()
        if result:
            return result
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {limit_s} s")
        time.sleep(poll_s)


def assert_all_end(processes: dict[int, int], limit_s: float = 120) -> None:
    """Every one of `processes` ends (within a generous bound on a hang); the message names the rest."""
    deadline = time.monotonic() + limit_s
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # the test must not leave them behind either
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"still running after their parent ended: {left}"
