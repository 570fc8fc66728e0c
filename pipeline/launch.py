"""The `jora` console entry: the process's allocator setting, then the click group (cli.py).

XLA's CPU runtime allocates a step's temporaries afresh on every call, and glibc serves allocations
that large with a new mmap and returns them with munmap, so every training step first-touches tens of
thousands of fresh 4 KiB pages, a noticeable share of a step's kernel time (benchmarks/RESULTS.md).
With glibc's `glibc.malloc.hugetlb=1` tunable those mappings get transparent huge pages (madvise
mode): a few hundred faults per step, the same peak RSS. glibc reads its tunables only when a process
starts, so the entry re-executes itself once with the tunable added to GLIBC_TUNABLES, before
anything heavy is imported; `jora deploy`'s flow runs inherit it. JORA_HUGE_PAGES=0 turns this off.

How a `jora` process ends is decided here too. SIGTERM (a scheduler, `kill`, the GUI's Stop) raises
`Stopped` in the main thread (pipeline/cli.py's main installs `stop_on_sigterm`), so cleanup runs and
the command ends in one line, "stopped by SIGTERM; ...", with exit status 143 (128 + 15, what a shell
reports for SIGTERM, and what a SIGTERM ended with before). A SIGTERM while training is the
trainer's own: it stops after the step, keeps a checkpoint and ends as bad input does (one line, 2).
Child processes (Prefect's servers, tokenizer workers) call stages/children.py's `die_with_parent` so that
they end with this process even when it is killed outright (kill -9, the out-of-memory killer), where no
cleanup runs.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
from pathlib import Path
from typing import Mapping

TUNABLE_NAME = "glibc.malloc.hugetlb"
TUNABLE = f"{TUNABLE_NAME}=1"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def tunes_huge_pages(environ: Mapping[str, str]) -> bool:
    """Whether environ's GLIBC_TUNABLES sets glibc's huge-page tunable (to any value)."""
    return any(t.split("=")[0] == TUNABLE_NAME for t in environ.get("GLIBC_TUNABLES", "").split(":"))


def huge_page_environment(environ: Mapping[str, str], thp_mode: str | None = None,
                          libc: str | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do: not glibc, huge pages
    off in the kernel ("[never]" or no THP at all), the user opted out, or the tunable already set
    (which is also what stops a second re-execution)."""
    libc = platform.libc_ver()[0] if libc is None else libc
    if libc != "glibc" or environ.get("JORA_HUGE_PAGES", "1") == "0":
        return None
    if tunes_huge_pages(environ):
        return None
    if thp_mode is None:
        try:
            thp_mode = _THP_MODE.read_text()
        except OSError:
            return None
    if "[always]" not in thp_mode and "[madvise]" not in thp_mode:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def reexecute_with_huge_pages() -> None:
    """Replace this process by the same command with huge_page_environment's environment; returns only
    when there is nothing to do (or the exec fails, which leaves this process running as it was)."""
    if not sys.platform.startswith("linux"):
        return
    env = huge_page_environment(os.environ)
    if env is None:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return


class Stopped(BaseException):
    """The process was asked to stop by a signal. A BaseException, like KeyboardInterrupt, so that
    `except Exception` blocks let it through to the command line."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise_stopped(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once, cleanup or not
    raise Stopped(signum)


def stop_on_sigterm() -> None:
    """SIGTERM raises Stopped (only the main thread receives signals; this is called from it)."""
    signal.signal(signal.SIGTERM, _raise_stopped)


def main() -> None:
    reexecute_with_huge_pages()
    from pipeline.cli import main as cli_main

    cli_main()
