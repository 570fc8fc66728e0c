"""Stopping a run on request (a cancelled Prefect run, a kill -TERM) at a step boundary, resumably."""

from __future__ import annotations

from jora_model.errors import JoraError


class TrainingInterrupted(JoraError):
    """Training stopped on request; the newest checkpoint holds the state to resume from."""


class StopOnSignal:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (only the main thread can
    receive signals; elsewhere nothing is installed and the defaults apply)."""

    def __init__(self):
        import signal
        import threading

        self.requested: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        if self.requested:  # a second signal: stop now
            self.restore()
            signal.raise_signal(signum)
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
