"""The run's checkpoints: written at the steps asked for (a hook), on a stop request, and named in
the message when a run has to stop; after a divergence, the ones it condemns are dropped."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from jora_model.training.hooks import StepEnd
from jora_model.training.stop import DivergenceWatch


class Checkpointer:
    """Writes the state with the reader position that goes with it; knows the newest good step."""

    def __init__(self, directory: Path, seed: int, total_steps: int, keep: int, team: Any,
                 last_good: int | None, watch: DivergenceWatch | None = None):
        self.directory = directory
        self.last_good = last_good  # the newest step whose checkpoint is on disk (None: none yet)
        self._seed = seed
        self._total_steps = total_steps
        self._keep = keep
        self._team = team
        self._watch = watch or DivergenceWatch(checks=False)

    def save(self, state: Any, step: int, position: Any) -> None:
        from jora_model.parallel import distributed
        from jora_model.training.checkpoint import save_checkpoint

        host_state = distributed.fetch(state)  # every process takes part; process 0 writes
        if self._team.is_leader:
            # The watch has read this step's metrics: its memory goes with the state, so that a resumed
            # run judges the next steps as an uninterrupted one would.
            save_checkpoint(self.directory, host_state,
                            {"step": step, "reader": dataclasses.asdict(position), "seed": self._seed,
                             "total_steps": self._total_steps, "divergence_watch": self._watch.history()},
                            keep=self._keep, settled=step - self._watch.lookback)

    def __call__(self, event: StepEnd) -> None:
        from jora_model.parallel import distributed

        with distributed.collective(f"saving the checkpoint of step {event.step}"):
            self.save(event.state, event.step, event.position)
        self.last_good = event.step
        distributed.set_resume_hint(f" from the checkpoint of step {event.step} in {self.directory}")

    def finish(self) -> None:
        """After the last step: nothing can be condemned any more, so only the newest `keep` stay."""
        from jora_model.training.checkpoint import prune_checkpoints

        if self._team.is_leader:
            prune_checkpoints(self.directory, self._keep)

    def kept(self) -> str:
        """What a failed run leaves to resume from, for its message."""
        found = self._watch.found
        if found is None:
            if self.last_good:
                return f"the last good checkpoint (step {self.last_good}) is kept in {self.directory}"
            return "no checkpoint had been written yet"
        suspect = found.onset - 1  # the weights the onset step was computed on
        removed = (f"; those of step {suspect} on are removed, as step {found.onset}'s metrics were computed on "
                   f"the weights step {suspect} left") if suspect >= 1 else ""
        newest = self._newest_before(suspect)
        if newest:
            return f"the last good checkpoint (step {newest}) is kept in {self.directory}{removed}"
        return f"no checkpoint from before step {max(suspect, 1)} is left, a rerun starts over{removed}"

    def drop_condemned(self) -> None:
        """After a divergence: remove the checkpoints from the step before its onset on, which hold the
        weights the bad metrics came from (or later ones), so that a rerun resumes from an older one."""
        from jora_model.parallel import distributed
        from jora_model.training.checkpoint import checkpoint_step, list_checkpoints

        found = self._watch.found
        if found is None:
            return
        if self._team.is_leader:
            for path in list_checkpoints(self.directory):
                if checkpoint_step(path) >= found.onset - 1:
                    shutil.rmtree(path)
        self.last_good = self._newest_before(found.onset - 1)
        distributed.set_resume_hint(f" from the checkpoint of step {self.last_good} in {self.directory}"
                                    if self.last_good else "")

    def _newest_before(self, step: int) -> int | None:
        """The newest checkpoint on disk older than `step` (the same answer before and after the drop,
        so every process of a run names the same one)."""
        from jora_model.training.checkpoint import checkpoint_step, list_checkpoints

        older = [checkpoint_step(p) for p in list_checkpoints(self.directory) if checkpoint_step(p) < step]
        return older[-1] if older else None
