"""Training progress, as a hook: a bar on a terminal, or a log line every few steps.

`progress`: True, a bar; False, nothing; None, a bar when stderr is a terminal; LINES, about
LINES_PER_RUN log lines on the "jora" logger (step/total, loss, the latest eval loss, tokens/s, ETA):
what a flow's log or a log file can hold, where a bar's carriage returns make one unreadable line.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

from jora_model.training.hooks import StepEnd

LINES = "lines"
LINES_PER_RUN = 15
log = logging.getLogger("jora")


class ProgressLines:
    """One line every `every` steps and at the last step; `every` is chosen so that the steps this run
    has left print about LINES_PER_RUN lines (a resumed run counts from where it resumed)."""

    def __init__(self, total: int, initial: int, emit: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.initial = total, initial
        self.every = max(1, math.ceil((total - initial) / LINES_PER_RUN))
        self._emit = emit or log.info
        self._clock = clock
        self._start: tuple[int, float] | None = None  # (step, time) of the first step seen
        self._eval: tuple[int, float] | None = None  # (step, eval loss) of the latest evaluation
        self._rates: list[float] = []  # tokens/s of the steps since the last line

    def __call__(self, event: StepEnd) -> None:
        now, record = self._clock(), event.record
        if self._start is None:
            # timed from the end of the first step: it includes compilation, which the rest will not
            self._start = (event.step, now)
        if "eval_loss" in record:
            self._eval = (event.step, record["eval_loss"])
        self._rates.append(record.get("tokens_per_s", 0.0))
        if (event.step - self.initial) % self.every and event.step != self.total:
            return
        self._emit(self.line(event.step, record["loss"], sum(self._rates) / len(self._rates), now))
        self._rates = []

    def line(self, step: int, loss: float, tokens_per_s: float, now: float) -> str:
        parts = [f"train: step {step}/{self.total} ({100 * step // max(self.total, 1)}%)", f"loss {loss:.4f}"]
        if self._eval is not None:
            parts.append(f"eval loss {self._eval[1]:.4f} (step {self._eval[0]})")
        parts.append(f"{tokens_per_s:.0f} tok/s")
        first_step, since = self._start or (step, now)
        if step > first_step and step < self.total:
            parts.append(f"ETA {_clock_time((now - since) / (step - first_step) * (self.total - step))}")
        return ", ".join(parts)


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    def __init__(self, total: int, initial: int, progress: bool | str | None, enabled: bool):
        from tqdm import tqdm

        self._lines = ProgressLines(total, initial) if progress == LINES and enabled else None
        hidden = (not progress) if progress is not None else None  # None: tqdm decides (a terminal or not)
        self._bar = tqdm(total=total, initial=initial, unit="step", desc="train",
                         disable=hidden if enabled and self._lines is None else True)

    def __call__(self, event: StepEnd) -> None:
        if self._lines is not None:
            self._lines(event)
            return
        self._bar.set_postfix(loss=f"{event.record['loss']:.4f}", tok_s=f"{event.record['tokens_per_s']:.0f}")
        self._bar.update()

    def close(self) -> None:
        self._bar.close()
