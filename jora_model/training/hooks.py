"""What runs after a training step: hooks, each due every N steps (and always at the last step).

A hook gets the step's metrics record and may return fields to add to it, which the hooks after it
see (evaluation adds eval_loss before the metrics log writes the line). A hook that needs the state
after its step (evaluation, checkpoints) says so: at such steps the loop waits for the step instead
of queueing the next one, because the next step consumes (donates) the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol


@dataclasses.dataclass(frozen=True)
class StepEnd:
    """One finished step as the hooks see it."""
    step: int
    record: dict[str, Any]  # the metrics line so far
    position: Any  # the data reader's position after this step's batches
    state: Any = None  # the state after this step; only given to hooks that asked for it


class Hook(Protocol):
    def __call__(self, event: StepEnd) -> dict[str, Any] | None: ...


def on_record(fn: Callable[[dict[str, Any]], Any]) -> Hook:
    """A hook from a function of the record alone (whatever it returns adds nothing to the record)."""

    def hook(event: StepEnd) -> None:
        fn(event.record)

    return hook


@dataclasses.dataclass(frozen=True)
class _Entry:
    hook: Hook
    every: int
    needs_state: bool


class Hooks:
    """The hooks of one run, in the order they were added."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._entries: list[_Entry] = []

    def add(self, hook: Hook | Callable[[StepEnd], Any], every: int = 1, needs_state: bool = False) -> None:
        """every: steps between calls (0: only at the last step)."""
        if every < 0:
            raise ValueError(f"every must be 0 or more, got {every}")
        self._entries.append(_Entry(hook, every, needs_state))

    def _due(self, entry: _Entry, step: int) -> bool:
        return bool(entry.every and step % entry.every == 0) or step == self.total_steps

    def need_state(self, step: int) -> bool:
        return any(e.needs_state and self._due(e, step) for e in self._entries)

    def run(self, event: StepEnd) -> dict[str, Any]:
        """Call the hooks due at this step; returns the record with what they added."""
        for entry in self._entries:
            if not self._due(entry, event.step):
                continue
            if entry.needs_state and event.state is None:
                raise RuntimeError(f"a hook needs the state of step {event.step}, but the loop moved on")
            extra = entry.hook(event)
            if extra:
                event = dataclasses.replace(event, record={**event.record, **extra})
        return event.record
