"""The training loop with a fake step: it queues step s+1 before it reads step s's metrics, waits
for a step whose state a hook needs, and never checkpoints a step whose loss it has not seen finite."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest

from jora_model.data.shards import ReaderPosition
from jora_model.errors import JoraError
from jora_model.training.batches import Fed
from jora_model.training.hooks import Hooks
from jora_model.training.loop import LoopParts, run_loop
from jora_model.training.stop import TrainingInterrupted


class Probe:
    """A metric that notes when the loop reads it (as reading a device array waits for its step)."""

    def __init__(self, events: list[str], step: int, value: float):
        self.events, self.step, self.value = events, step, value

    def __float__(self) -> float:
        self.events.append(f"read {self.step}")
        return self.value

    def __int__(self) -> int:
        return int(self.value)


class Metrics(NamedTuple):
    loss: Any
    lr: Any
    grad_norm: Any
    tokens: Any


@dataclasses.dataclass
class FakeCheckpoints:
    events: list[str]
    directory: str = "ckpts"
    last_good: int | None = None

    def save(self, state: Any, step: int, position: Any) -> None:
        self.events.append(f"save {step} state {state} at {position.batch}")

    def kept(self) -> str:
        return f"last good {self.last_good}"

    def __call__(self, event) -> None:
        self.save(event.state, event.step, event.position)
        self.last_good = event.step


class Team:
    def __init__(self, stop_before: int | None = None):
        self.stop_before = stop_before

    def any(self, flag: bool, doing: str) -> bool:
        return flag or doing.endswith(f"before step {self.stop_before}")


def _run(total: int, *, hooks: Hooks | None = None, nan_at: int | None = None, team: Team | None = None):
    events: list[str] = []
    hooks = hooks or Hooks(total)
    checkpoints = FakeCheckpoints(events)
    hooks.add(checkpoints, every=0, needs_state=True)  # the last step, as the trainer's checkpoint at the end

    def feed(step: int) -> Fed:
        events.append(f"feed {step}")
        return Fed({"step": step}, tokens=10, position=ReaderPosition(0, step))

    def train_step(state: int, batch: dict) -> tuple[int, Metrics]:
        step = state + 1
        events.append(f"dispatch {step}")
        loss = float("nan") if step == nan_at else 1.0 / step
        return step, Metrics(Probe(events, step, loss), 1e-3, 0.5, 7)

    parts = LoopParts(0, total, ReaderPosition(0, 0), feed, train_step, hooks, checkpoints, team or Team(),
                      stop=type("Stop", (), {"requested": None})())
    return events, lambda: run_loop(parts, 0)


def test_the_next_step_is_queued_before_the_last_ones_metrics_are_read():
    events, run = _run(4)
    end = run()
    order = [e for e in events if not e.startswith("feed")]
    # A loop that read each step's loss right after dispatching it would give dispatch 1, read 1, ...
    assert order == ["dispatch 1", "dispatch 2", "read 1", "dispatch 3", "read 2", "dispatch 4", "read 3",
                     "read 4", "save 4 state 4 at 4"]
    assert events.index("feed 2") < events.index("read 1")  # the next batch is placed before the wait
    assert end.step == 4 and end.state == 4 and end.last_record["loss"] == 0.25


def test_a_hook_that_needs_the_state_gets_it_before_the_next_step():
    hooks = Hooks(5)
    seen: list[tuple[int, Any]] = []
    hooks.add(lambda event: seen.append((event.step, event.state)) or {"eval_loss": 2.0}, every=2,
              needs_state=True)
    records: list[dict] = []
    hooks.add(lambda event: records.append(event.record))
    events, run = _run(5, hooks=hooks)
    run()
    assert seen == [(2, 2), (4, 4), (5, 5)]  # the state after exactly that step
    order = [e for e in events if not e.startswith("feed")]
    assert order.index("read 2") < order.index("dispatch 3")
    assert order.index("read 4") < order.index("dispatch 5")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [("eval_loss" in r) for r in records] == [False, True, False, True, True]
    assert list(records[0]) == ["step", "loss", "lr", "grad_norm", "tokens_per_s", "loss_tokens", "epoch"]


def test_a_bad_loss_stops_before_anything_of_its_state_is_saved():
    events, run = _run(3, nan_at=3)
    with pytest.raises(JoraError, match=r"^loss became nan at step 3; stopping \(last good None\)"):
        run()
    assert not any(e.startswith("save") for e in events)
    events, run = _run(4, nan_at=2)
    with pytest.raises(JoraError, match="loss became nan at step 2"):
        run()
    assert not any(e.startswith("save") for e in events)


def test_a_stop_request_finishes_the_step_in_flight_and_checkpoints_it():
    events, run = _run(6, team=Team(stop_before=4))
    with pytest.raises(TrainingInterrupted, match="at step 3; checkpoint kept in ckpts"):
        run()
    # Step 4's batch was already drawn when the stop came; the checkpoint keeps step 3's reader position.
    assert events[-2:] == ["read 3", "save 3 state 3 at 3"]
    assert "dispatch 4" not in events
