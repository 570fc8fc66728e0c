"""A training run: setup, the loop, and the hooks around it (metrics, progress, evaluation, checkpoints).

Everything a run writes lives in one work directory:
    checkpoints/ckpt-NNNNNNNN/   state + reader position (the newest few)
    metrics.jsonl                one JSON object per logged step (and per evaluation)
    tensorboard/                 event files
    adapter/                     the finished adapter (adapter.safetensors, adapter.json)
    loss.png                     the loss curve, written at the end
Starting again on the same work directory resumes from the newest checkpoint; the result is
bitwise identical to a run that was never interrupted.

Several processes (distributed.initialize, before this) train as one: the mesh spans every process's
devices, each process reads only its own rows of each global batch and its own slices of the frozen
base, and process 0 alone writes checkpoints, metrics and the adapter into the shared work directory.

The pieces: setup.py builds what the run needs, loop.py runs the steps, hooks.py schedules what
follows a step (evaluation.py, metrics_log.py, progress.py, checkpointer.py), stop.py handles signals.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from jora_model.training.checkpointer import Checkpointer
from jora_model.training.hooks import Hooks, on_record
from jora_model.training.loop import LoopEnd, LoopParts, run_loop
from jora_model.training.metrics_log import METRICS, MetricsLog, plot_loss, read_records
from jora_model.training.settings import TrainSettings
from jora_model.training.setup import TrainingSetup, setup_training
from jora_model.training.stop import DivergenceWatch, StopOnSignal, TrainingDiverged
from jora_model.training.stop import TrainingInterrupted  # noqa: F401  (raised by the loop)

log = logging.getLogger("jora")


@dataclasses.dataclass
class TrainResult:
    adapter: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    resumed_from: int | None  # step of the checkpoint the run continued from


def run_training(store_path: Path, data_dir: Path, work_dir: Path, settings: TrainSettings,
                 base_hash: str = "", init_adapter: Path | None = None,
                 on_metrics: Callable[[dict[str, Any]], None] | None = None,
                 progress: bool | None = None) -> TrainResult:
    from jora_model.parallel import distributed

    team = distributed.current_team()
    try:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        setup = setup_training(store_path, data_dir, work_dir, settings, init_adapter, team)
        end = _train(setup, work_dir, settings, on_metrics, progress, team)
        return _finish(setup, end, work_dir, settings, base_hash, team)
    except BaseException:
        distributed.mark_failed()  # the peers must not wait at the shutdown barrier for this process
        raise


def _train(setup: TrainingSetup, work_dir: Path, settings: TrainSettings,
           on_metrics: Callable[[dict[str, Any]], None] | None, progress: bool | None, team: Any) -> LoopEnd:
    from jora_model.training.batches import Feeder
    from jora_model.training.evaluation import Evaluation
    from jora_model.training.progress import ProgressBar
    from jora_model.parallel import sharding

    first_step = setup.first_step
    metrics_log = MetricsLog(work_dir, first_step, enabled=team.is_leader)
    bar = ProgressBar(setup.total_steps, first_step, progress, enabled=team.is_leader)
    watch = DivergenceWatch(settings.divergence_check, setup.config.vocab_size, _watch_history(setup))
    checkpointer = Checkpointer(setup.checkpoints, settings.seed, setup.total_steps, settings.keep_checkpoints,
                                team, last_good=setup.resumed_from, watch=watch)
    hooks = Hooks(setup.total_steps)
    if setup.val_dir is not None:
        hooks.add(Evaluation(setup.fns, setup.frozen, setup.mesh, setup.val_dir, settings),
                  every=settings.eval_every, needs_state=True)
    hooks.add(on_record(metrics_log.write))
    if on_metrics:
        hooks.add(on_record(on_metrics))
    hooks.add(bar)
    hooks.add(checkpointer, every=settings.checkpoint_every, needs_state=True)
    feed = Feeder(setup.reader, settings.grad_accum, settings.batch_size, sharding.batch_sharding(setup.mesh))
    frozen, train_step = setup.frozen, setup.fns.train_step
    stop = StopOnSignal()
    try:
        end = run_loop(LoopParts(first_step, setup.total_steps, setup.reader.position, feed,
                                 lambda state, batch: train_step(state, frozen, batch), hooks, checkpointer,
                                 team, stop, watch), setup.state)
        checkpointer.finish()
        return end
    except TrainingDiverged:
        checkpointer.drop_condemned()  # a rerun must not resume from the weights that went bad
        raise
    finally:
        stop.restore()
        bar.close()
        metrics_log.close()


def _watch_history(setup: TrainingSetup) -> dict[str, Any] | None:
    """What the divergence checks had seen by the checkpoint this run resumes from (None: a fresh run,
    or a checkpoint written before they existed)."""
    from jora_model.training.checkpoint import checkpoint_info

    if setup.resumed_from is None:
        return None
    return checkpoint_info(setup.checkpoints, setup.resumed_from).get("divergence_watch")


def _finish(setup: TrainingSetup, end: LoopEnd, work_dir: Path, settings: TrainSettings, base_hash: str,
            team: Any) -> TrainResult:
    """Write the adapter and the loss curve (process 0), once every process is done."""
    from jora_model.formats.adapter import save_adapter
    from jora_model.parallel import distributed

    final_loss = end.last_record["loss"] if end.last_record else None
    eval_loss = end.last_record.get("eval_loss") if end.last_record else None
    lora = distributed.fetch(end.state.lora)
    adapter = work_dir / "adapter"
    if team.is_leader:
        records = read_records(work_dir / METRICS)
        if final_loss is None and records:  # resumed at the very end: report what the log holds
            final_loss = next((r["loss"] for r in reversed(records) if "loss" in r), None)
            eval_loss = next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None)
        save_adapter(adapter, lora, settings.lora, setup.config, base_hash,
                     {"steps": end.step, "train_settings": settings.to_dict()})
        plot_loss(records, work_dir / "loss.png")
    team.barrier("jora: adapter written")  # the others return once the adapter is on disk
    return TrainResult(adapter, end.step, final_loss, eval_loss, setup.resumed_from)
