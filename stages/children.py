"""Child processes that end with their parent, however it ends (kill -9 and the out-of-memory killer
included, where no cleanup runs): Prefect's servers started by `jora run` / `jora server`, and the
tokenize stage's workers. Here rather than in pipeline/ because the stages start children too.
"""

from __future__ import annotations

import os
import signal
import sys

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
