"""The run's checkpoints: written at the steps asked for (a hook), on a stop request, and named in
the message when a run has to stop."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jora_model.training.hooks import StepEnd


class Checkpointer:
    """Writes the state with the reader position that goes with it; knows the newest good step."""

    def __init__(self, directory: Path, seed: int, total_steps: int, keep: int, team: Any,
                 last_good: int | None):
        self.directory = directory
        self.last_good = last_good  # the newest step whose checkpoint is on disk (None: none yet)
        self._seed = seed
        self._total_steps = total_steps
        self._keep = keep
        self._team = team

    def save(self, state: Any, step: int, position: Any) -> None:
        from jora_model.parallel import distributed
        from jora_model.training.checkpoint import save_checkpoint

        host_state = distributed.fetch(state)  # every process takes part; process 0 writes
        if self._team.is_leader:
            save_checkpoint(self.directory, host_state,
                            {"step": step, "reader": dataclasses.asdict(position), "seed": self._seed,
                             "total_steps": self._total_steps}, keep=self._keep)

    def __call__(self, event: StepEnd) -> None:
        from jora_model.parallel import distributed

        with distributed.collective(f"saving the checkpoint of step {event.step}"):
            self.save(event.state, event.step, event.position)
        self.last_good = event.step
        distributed.set_resume_hint(f" from the checkpoint of step {event.step} in {self.directory}")

    def kept(self) -> str:
        """What a failed run leaves to resume from, for its message."""
        if self.last_good:
            return f"the last good checkpoint (step {self.last_good}) is kept in {self.directory}"
        return "no checkpoint had been written yet"
