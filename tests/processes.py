"""Child processes the tests start in their own process group (servers and the jobs they spawn)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


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
