"""The training loop: dispatch steps, read their metrics one step late, run the hooks.

The host never waits for the step it has just dispatched. After dispatching step s it builds and
places step s+1's batch and dispatches step s+1, and only then reads step s's metrics (which blocks
until step s is done), so the devices always have the next step queued. Where a hook needs the state
after step s (evaluation, a checkpoint, the last step), the loop reads step s's metrics and runs the
hooks before dispatching step s+1, which consumes that state. A step's loss and gradient norm are read,
and judged (stop.DivergenceWatch), before anything of its state is written; as they were computed on
the state before the step, a bad step also condemns the checkpoint of the step before it (the
trainer drops those: Checkpointer.drop_condemned).

Every process of a multi-process run takes the same decisions at the same steps: the stop request is
agreed on (team.any) before each step, the metrics are replicated, and the hooks' steps are fixed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol

from jora_model.training.batches import Fed
from jora_model.training.hooks import Hooks, StepEnd
from jora_model.training.stop import DivergenceWatch, TrainingDiverged, TrainingInterrupted


class Checkpoints(Protocol):
    directory: Any
    last_good: int | None

    def save(self, state: Any, step: int, position: Any) -> None: ...

    def kept(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class LoopParts:
    first_step: int  # the step of the state the loop starts from
    total_steps: int
    position: Any  # the reader position that goes with that state
    feed: Callable[[int], Fed]  # step number -> its batch, placed
    train_step: Callable[[Any, Any], tuple[Any, Any]]  # (state, batch) -> (state, metrics); donates the state
    hooks: Hooks
    checkpoints: Checkpoints  # for a stop request and the message when the loss goes bad
    team: Any  # jora_model.parallel.distributed.Team
    stop: Any  # its `requested` names the signal that asked to stop (None: carry on)
    # judges each step's metrics (the default stops on a non-finite loss or gradient norm only)
    watch: DivergenceWatch = dataclasses.field(default_factory=lambda: DivergenceWatch(checks=False))


@dataclasses.dataclass(frozen=True)
class LoopEnd:
    state: Any
    step: int
    last_record: dict[str, Any] | None  # the metrics of the last step run (None: no step ran)


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A step on its way: its metrics are device arrays until read."""
    step: int
    metrics: Any
    fed: Fed


def run_loop(parts: LoopParts, state: Any) -> LoopEnd:
    return _Loop(parts, state).run()


class _Loop:
    def __init__(self, parts: LoopParts, state: Any):
        self.parts = parts
        self.state = state
        self.step = parts.first_step
        self.position = parts.position
        self.pending: _Dispatched | None = None  # dispatched, metrics not read yet
        self.last_record: dict[str, Any] | None = None
        self.mark = time.perf_counter()  # when the previous step's metrics were read

    def run(self) -> LoopEnd:
        parts = self.parts
        while self.step < parts.total_steps:
            fed = parts.feed(self.step + 1)
            # A cancelled Prefect run or a kill -TERM stops between steps, resumably; every process
            # stops at the same step, even when only one of them got the signal.
            if parts.team.any(bool(parts.stop.requested), f"checking for a stop request before step {self.step + 1}"):
                self._stop()
            current = self._dispatch(fed)
            if self.pending is not None:
                self._finish(self.pending, None)
            self.pending = current
            if parts.hooks.need_state(current.step):
                self.pending = None
                self._finish(current, self.state)
        if self.pending is not None:
            self._finish(self.pending, None)
        return LoopEnd(self.state, self.step, self.last_record)

    def _dispatch(self, fed: Fed) -> _Dispatched:
        from jora_model.parallel import distributed

        step = self.step + 1
        with distributed.collective(f"training step {step}"):
            self.state, metrics = self.parts.train_step(self.state, fed.arrays)
        self.step, self.position = step, fed.position
        return _Dispatched(step, metrics, fed)

    def _finish(self, done: _Dispatched, state: Any) -> None:
        """Read a step's metrics (waiting for it), stop if they show a diverging model, run its hooks."""
        record = self._read(done)
        record = self.parts.hooks.run(StepEnd(done.step, record, done.fed.position, state))
        self.last_record = record
        if state is not None:
            self.mark = time.perf_counter()  # evaluation and checkpoints are not training time

    def _read(self, done: _Dispatched) -> dict[str, Any]:
        from jora_model.parallel import distributed

        metrics = done.metrics
        with distributed.collective(f"training step {done.step}"):
            loss = float(metrics.loss)
            lr, grad_norm, tokens = float(metrics.lr), float(metrics.grad_norm), int(metrics.tokens)
        found = self.parts.watch.see(done.step, loss, grad_norm)
        if found is not None:
            advice = "Try a lower --lr" + (" (or --no-divergence-check if the run is fine)" if found.heuristic else "")
            raise TrainingDiverged(f"{found.what}; stopping ({self.parts.checkpoints.kept()}). {advice}.", found.onset)
        now = time.perf_counter()
        elapsed, self.mark = now - self.mark, now
        return {"step": done.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": done.fed.tokens / elapsed, "loss_tokens": tokens, "epoch": done.fed.position.epoch}

    def _stop(self) -> None:
        """Finish the step in flight and keep a checkpoint of the state after it."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._finish(pending, None)
        checkpoints = self.parts.checkpoints
        if checkpoints.last_good != self.step:
            checkpoints.save(self.state, self.step, self.position)
        raise TrainingInterrupted(f"stopped by {self.parts.stop.requested or 'another process'} at step {self.step}; "
                                  f"checkpoint kept in {checkpoints.directory}: the same command resumes from it")
