"""Child processes that end with their parent, however it ends (kill -9 and the out-of-memory killer
included, where no cleanup runs): Prefect's servers started by `jora run` / `jora server`, the
tokenize stage's workers, and the runs and answers the GUI starts. Here rather than in pipeline/
because the stages start children too.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import subprocess
import sys
import threading

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _prctl():
    """libc's prctl, or None off Linux. Looked up before a fork: loading a library in a forked child
    of a threaded process can deadlock on the loader's lock."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL, prctl=None) -> None:
    """Called in a child process: receive `signum` when the parent dies, however it dies (Linux; a
    no-op elsewhere). The kernel sends it when the *thread* that started the child ends, so children
    are started from the main thread or from one that outlives them. A parent already gone before this
    ran is not seen by the kernel, hence the check after it."""
    prctl = prctl or _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return  # not fatal: the child then outlives a killed parent, as it always did
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def child_dies_with_us(signum: int = signal.SIGKILL):
    """A `preexec_fn` for subprocess.Popen: the child gets `signum` when this process dies. It runs in
    the forked child before exec (the setting survives exec), so it only makes the one system call."""
    parent, prctl = os.getpid(), _prctl()
    return lambda: die_with_parent(parent, signum, prctl)


_spawner_lock = threading.Lock()
_spawner_queue: "queue.Queue | None" = None


def _spawner() -> "queue.Queue":
    """The queue of the one thread that starts tied children from other threads. The kernel sends the
    parent-death signal when the thread that forked ends, and a web server's handler threads come and go
    (a pool's idle thread exits), which would stop a run started from one; this thread lives as long as
    the process (daemon: it never keeps the process alive)."""
    global _spawner_queue
    with _spawner_lock:
        if _spawner_queue is None:
            _spawner_queue = queue.Queue()
            threading.Thread(target=_serve_spawns, args=(_spawner_queue,), name="jora-spawner", daemon=True).start()
        return _spawner_queue


def _serve_spawns(requests: "queue.Queue") -> None:
    while True:
        start, done = requests.get()
        try:
            done.set_result(start())
        except BaseException as exc:  # the caller's thread raises it
            done.set_exception(exc)


def popen_tied(command: list, signum: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(command, **kwargs) for a child that gets `signum` when this process dies (kill -9
    included), whichever thread asks."""
    def start() -> subprocess.Popen:
        return subprocess.Popen(command, preexec_fn=child_dies_with_us(signum), **kwargs)

    if threading.current_thread() is threading.main_thread():
        return start()
    done: concurrent.futures.Future = concurrent.futures.Future()
    _spawner().put((start, done))
    return done.result()
