"""Stopping a run: on request (a cancelled Prefect run, a kill -TERM) at a step boundary, resumably, and
when its metrics show a dead or diverging model (DivergenceWatch)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

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


# Divergence: what a step's metrics say about the model. The rule for checkpoints: a step's loss and
# gradient norm are computed on the weights that the step before it left, so when step s is the first
# whose metrics show the damage (the onset), the weights after step s-1 are suspect, and with them every
# checkpoint from step s-1 on (a checkpoint of step t holds the weights after t's update). The newest
# checkpoint before s-1 holds weights that a later step was seen to work on; that one is kept.
LOSS_WINDOW = 10  # steps: the run's start is the mean loss of its first LOSS_WINDOW steps ...
LOSS_MARGIN = 1.0  # ... and every one of LOSS_WINDOW consecutive losses this many nats above it is a divergence
ZERO_GRAD_STEPS = 3  # consecutive steps with a gradient norm of exactly 0 ...
LIVE_LOSS = 0.01  # ... at a loss above this many nats: something left to learn, yet no gradient (a dead model)


@dataclasses.dataclass(frozen=True)
class Divergence:
    onset: int  # the first step whose metrics showed it (computed on the weights after step onset-1)
    what: str  # what was seen, for the message
    heuristic: bool  # a judgement call the user may turn off (train.divergence_check), not a NaN


class TrainingDiverged(JoraError):
    """The run's metrics show a dead or diverging model; the checkpoints from onset-1 on are suspect."""

    def __init__(self, message: str, onset: int, path=None):
        super().__init__(message, path)
        self.onset = onset


class DivergenceWatch:
    """Reads each step's loss and gradient norm, the values the step already returns, in step order.

    A non-finite loss or gradient norm always stops the run. With `checks` it also stops when the
    gradient norm was exactly 0 for ZERO_GRAD_STEPS steps in a row at a loss above LIVE_LOSS (a live
    model that still gets tokens wrong has some gradient), or when LOSS_WINDOW consecutive losses
    each lay more than LOSS_MARGIN nats above the run's start: a nat is e times the perplexity of the
    model the run began with, and requiring every step of a window (not their mean) keeps a noisy run of
    single-row batches from tripping it. What it remembers goes into each checkpoint (`history`), so a
    resumed run takes the same decisions as one never interrupted."""

    def __init__(self, checks: bool = True, vocab_size: int | None = None, history: dict[str, Any] | None = None):
        self.checks = checks
        self.vocab_size = vocab_size
        self.found: Divergence | None = None
        history = history or {}
        self._losses: list[tuple[int, float]] = [(int(s), float(v)) for s, v in history.get("losses", [])]
        self._start: list[float] | None = history.get("start")  # [mean loss, first step, last step]
        self._zeros: list[int] = list(history.get("zeros", [0, 0]))  # [steps in a row, the first of them]

    @property
    def lookback(self) -> int:
        """How far back from the step that fires a check its onset can lie: once step d was read, no later
        finding condemns a checkpoint at or before d - lookback (the checkpointer keeps every newer one,
        and the newest one at or before it, so the best one to resume from is always on disk)."""
        return max(1, ZERO_GRAD_STEPS, LOSS_WINDOW) if self.checks else 1

    def see(self, step: int, loss: float, grad_norm: float) -> Divergence | None:
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            name, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
            self.found = Divergence(step, f"{name} became {value} at step {step}", heuristic=False)
            return self.found
        vanished, risen = self._vanished(step, loss, grad_norm), self._risen(step, loss)
        if self.checks:
            self.found = vanished or risen
        return self.found

    def history(self) -> dict[str, Any]:
        return {"losses": [list(p) for p in self._losses], "start": self._start, "zeros": list(self._zeros)}

    def _vanished(self, step: int, loss: float, grad_norm: float) -> Divergence | None:
        if grad_norm != 0.0 or loss <= LIVE_LOSS:
            self._zeros = [0, 0]
            return None
        self._zeros = [self._zeros[0] + 1, self._zeros[1] if self._zeros[0] else step]
        if self._zeros[0] < ZERO_GRAD_STEPS:
            return None
        uniform = f", uniform guessing gives {math.log(self.vocab_size):.4f}" if self.vocab_size else ""
        return Divergence(self._zeros[1], f"the gradient norm was exactly 0 at steps {self._zeros[1]}-{step} with "
                          f"the loss at {loss:.4f}{uniform}: the model is dead", heuristic=True)

    def _risen(self, step: int, loss: float) -> Divergence | None:
        self._losses = (self._losses + [(step, loss)])[-LOSS_WINDOW:]
        if len(self._losses) < LOSS_WINDOW:
            return None
        if self._start is None:  # the run's first LOSS_WINDOW steps (kept in the checkpoints from then on)
            self._start = [sum(v for _, v in self._losses) / LOSS_WINDOW, self._losses[0][0], step]
        mean, first, last = self._start
        if min(v for _, v in self._losses) <= mean + LOSS_MARGIN:
            return None
        onset = self._losses[0][0]
        return Divergence(onset, f"the loss stayed more than {LOSS_MARGIN:g} nat above the run's start ({mean:.4f}, "
                          f"the mean of steps {int(first)}-{int(last)}) at steps {onset}-{step} (now {loss:.4f})",
                          heuristic=True)
