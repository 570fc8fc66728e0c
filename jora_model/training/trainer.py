"""The training loop around the jitted step: data, mesh, checkpoints, resume, evaluation, metrics.

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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jora_model.formats.adapter import load_adapter, save_adapter
from jora_model.model.config import LlamaConfig
from jora_model.data.shards import Batch, BatchReader, BatchSettings, ReaderPosition
from jora_model.errors import JoraError
from jora_model.model.lora import init_lora_params
from jora_model.training.settings import TrainSettings

log = logging.getLogger("jora")


@dataclasses.dataclass
class TrainResult:
    adapter: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    resumed_from: int | None  # step of the checkpoint the run continued from


class TrainingInterrupted(JoraError):
    """Training stopped on request; the newest checkpoint holds the state to resume from."""


class _StopOnSignal:
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


def _mesh_shape(spec: str):
    import jax

    from jora_model.parallel.sharding import MeshShape

    if spec:
        return MeshShape.parse(spec)
    return MeshShape(data=1, model=len(jax.devices()))


def check_token_ids(directory: Path, vocab_size: int) -> None:
    """Data tokenized for another vocabulary would index past the embedding (JAX clamps silently)."""
    from jora_model.data.shards import ShardSet

    largest, where = ShardSet(directory).max_token_id()
    if largest >= vocab_size:
        raise JoraError(f"token id {largest} is outside the model's vocabulary of {vocab_size}: "
                        "the data was tokenized with another model's tokenizer", where)


def _stack(batches: list[Batch], length: int | None = None) -> dict[str, np.ndarray]:
    """[A, B, T] arrays from A micro-batches, padded to a common T."""
    t = length or max(b.input_ids.shape[1] for b in batches)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, t - a.shape[1])))

    return {"input_ids": np.stack([pad(b.input_ids) for b in batches]),
            "loss_mask": np.stack([pad(b.loss_mask) for b in batches]),
            "segment_ids": np.stack([pad(b.segment_ids) for b in batches])}


class MetricsLog:
    """metrics.jsonl (truncated back to the resumed step, so a resumed run has no duplicates) and
    TensorBoard events. Disabled (writes nothing) on every process but the one that writes outputs."""

    def __init__(self, work_dir: Path, resume_step: int, enabled: bool = True):
        self.path = work_dir / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(work_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_training(store_path: Path, data_dir: Path, work_dir: Path, settings: TrainSettings,
                 base_hash: str = "", init_adapter: Path | None = None,
                 on_metrics: Callable[[dict[str, Any]], None] | None = None,
                 progress: bool | None = None) -> TrainResult:
    from jora_model.parallel import distributed

    team = distributed.current_team()
    try:
        return _run(store_path, data_dir, work_dir, settings, base_hash, init_adapter, on_metrics, progress, team)
    except BaseException:
        distributed.mark_failed()  # the peers must not wait at the shutdown barrier for this process
        raise


def _run(store_path, data_dir, work_dir, settings: TrainSettings, base_hash, init_adapter, on_metrics, progress,
         team) -> TrainResult:
    from tqdm import tqdm

    from jora_model.parallel import distributed
    from jora_model.parallel import sharding
    from jora_model.training.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
    from jora_model.formats.store import Store, load_params
    from jora_model.training.step import OptimizerSettings, abstract_arguments, make_step_functions

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    store = Store(store_path)
    config: LlamaConfig = store.config
    if settings.max_seq_len > config.max_seq_len:
        raise JoraError(f"max_seq_len {settings.max_seq_len} is longer than the model allows ({config.max_seq_len})")
    train_dir, val_dir = Path(data_dir) / "train", Path(data_dir) / "val"
    if not train_dir.is_dir():
        raise JoraError("no train/ split here (run jora tokenize first)", data_dir)
    mesh_shape = _mesh_shape(settings.mesh)
    sharding.check_divisible(config, mesh_shape, settings.batch_size)
    mesh = sharding.make_mesh(mesh_shape)
    batch_settings = BatchSettings(batch_size=settings.batch_size, seed=settings.seed,
                                   pad_multiple=settings.pad_multiple)
    # This process's rows of every global batch (all of them on one process): it reads only those.
    my_rows = distributed.local_rows(sharding.batch_sharding_2d(mesh), (settings.batch_size, 1))
    reader = BatchReader(train_dir, batch_settings, rows=my_rows)
    longest = int(reader.shards.lengths().max())
    if longest > settings.max_seq_len:
        raise JoraError(f"the data has rows of {longest} tokens, more than max_seq_len {settings.max_seq_len}",
                        train_dir)
    check_token_ids(train_dir, config.vocab_size)
    has_val = val_dir.is_dir() and any(val_dir.glob("part-*.arrow"))
    if has_val:
        check_token_ids(val_dir, config.vocab_size)
    steps_per_epoch = reader.batches_per_epoch / settings.grad_accum
    total_steps = max(1, math.ceil(settings.epochs * steps_per_epoch))
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)

    # Initial adapter: fresh, or warm-started from an earlier one (same rank and targets).
    if init_adapter is not None:
        lora_init, lora_from, _ = load_adapter(init_adapter, config)
        if (lora_from.r, lora_from.targets) != (settings.lora.r, settings.lora.targets):
            raise JoraError(f"--init-adapter has r={lora_from.r}, targets {','.join(lora_from.targets)}; this run "
                            f"asks for r={settings.lora.r}, targets {','.join(settings.lora.targets)}", init_adapter)
    else:
        lora_init = init_lora_params(config, settings.lora, settings.seed)

    optimizer = OptimizerSettings(lr=settings.lr, warmup_steps=round(settings.warmup_ratio * total_steps),
                                  total_steps=total_steps, weight_decay=settings.weight_decay,
                                  max_grad_norm=settings.max_grad_norm)
    fns = make_step_functions(config, settings.lora, optimizer, settings.compute_dtype, settings.remat,
                              settings.seed, mesh, kernels=settings.kernels)
    batch_sharding = sharding.batch_sharding(mesh)

    checkpoints = work_dir / "checkpoints"
    # Process 0 picks the newest checkpoint that loads and the others load the same one, so every
    # process resumes from the same step even if one of them sees the shared directory differently.
    resumed = latest_checkpoint(checkpoints, fns.abstract_state, fns.state_shardings) if team.is_leader else None
    resume_step = team.broadcast_int(int(resumed[1]["step"]) if resumed is not None else -1,
                                     "agreeing on the checkpoint to resume from")
    if resume_step >= 0 and resumed is None:
        resumed = load_checkpoint(checkpoint_path(checkpoints, resume_step), fns.abstract_state,
                                  fns.state_shardings)
    resumed_from = None
    if resumed is not None:
        state, info = resumed
        reader.position = ReaderPosition(**info["reader"])
        resumed_from = int(info["step"])
        log.info("train: resuming from step %d (%s)", resumed_from, checkpoints)
        distributed.set_resume_hint(f" from the checkpoint of step {resumed_from} in {checkpoints}")
    else:
        state = fns.init(distributed.place(lora_init, fns.state_shardings.lora))
    step = int(state.step)
    prepare = getattr(fns.train_step, "prepare", None)  # AheadOfTime's; a wrapped step has none
    if step < total_steps and prepare is not None:
        # Compile the first step before the weights are loaded, so that the compiler's working memory
        # (a few hundred MB) and the weights never add up. A second reader from the same position
        # gives the first batch's length without moving the real one.
        ahead = iter(BatchReader(train_dir, batch_settings, position=reader.position, rows=my_rows))
        length = _stack([next(ahead) for _ in range(settings.grad_accum)])["input_ids"].shape[2]
        prepare(*abstract_arguments(config, fns, mesh, (settings.grad_accum, settings.batch_size, length),
                                    store.dtype.name))
    frozen = load_params(store, lambda path, shape: sharding.param_sharding(mesh, path, shape), bits=True)
    store.close()
    metrics_log = MetricsLog(work_dir, step, enabled=team.is_leader)

    def checkpoint() -> None:
        host_state = distributed.fetch(state)  # every process takes part; process 0 writes
        if team.is_leader:
            save_checkpoint(checkpoints, host_state,
                            {"step": step, "reader": dataclasses.asdict(reader.position), "seed": settings.seed,
                             "total_steps": total_steps}, keep=settings.keep_checkpoints)

    def evaluate() -> dict[str, float] | None:
        if not has_val:
            return None
        eval_bs = settings.eval_batch_size or settings.batch_size
        eval_sharding = sharding.batch_sharding_2d(mesh)
        rows_here = distributed.local_rows(eval_sharding, (eval_bs, 1))
        val = BatchReader(val_dir, BatchSettings(batch_size=eval_bs, shuffle=False, drop_last=False,
                                                 pad_multiple=settings.pad_multiple), rows=rows_here)
        want = rows_here.stop - rows_here.start
        nll = tokens = 0.0
        for i, batch in zip(range(val.batches_per_epoch), val):
            arrays = _stack([batch])
            rows = arrays["input_ids"].shape[1]
            if rows < want:  # last short batch: empty rows (segment 0, no targets) keep the shape
                arrays = {k: np.pad(v, ((0, 0), (0, want - rows), (0, 0))) for k, v in arrays.items()}
            length = arrays["input_ids"].shape[2]
            placed = {k: distributed.global_batch(v[0], eval_sharding, (eval_bs, length)) for k, v in arrays.items()}
            s, n = fns.eval_step(state.lora, frozen, placed)
            nll, tokens = nll + float(s), tokens + float(n)
        loss = nll / max(tokens, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": tokens}

    hidden = (not progress) if progress is not None else None  # None: tqdm decides (a terminal or not)
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="train", disable=hidden if team.is_leader else True)
    final_loss = eval_loss = None
    last_good = resumed_from
    iterator = iter(reader)
    stop = _StopOnSignal()
    try:
        while step < total_steps:
            # A cancelled Prefect run or a kill -TERM stops between steps, resumably; every process
            # stops at the same step, even when only one of them got the signal.
            if team.any(bool(stop.requested), f"checking for a stop request before step {step + 1}"):
                if last_good != step:
                    checkpoint()
                raise TrainingInterrupted(f"stopped by {stop.requested or 'another process'} at step {step}; "
                                          f"checkpoint kept in {checkpoints}: the same command resumes from it")
            started = time.perf_counter()
            micro = [next(iterator) for _ in range(settings.grad_accum)]
            arrays = _stack(micro)
            real_tokens = sum(b.tokens for b in micro)  # the whole global batch, other processes' rows too
            global_shape = (settings.grad_accum, settings.batch_size, arrays["input_ids"].shape[2])
            with distributed.collective(f"training step {step + 1}"):
                placed = {k: distributed.global_batch(v, batch_sharding, global_shape) for k, v in arrays.items()}
                state, metrics = fns.train_step(state, frozen, placed)
                loss = float(metrics.loss)
            step += 1
            if not math.isfinite(loss):
                where = f"the last good checkpoint (step {last_good}) is kept in {checkpoints}" if last_good \
                    else "no checkpoint had been written yet"
                raise JoraError(f"loss became {loss} at step {step}; stopping ({where}). Try a lower --lr.")
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": loss, "lr": float(metrics.lr), "grad_norm": float(metrics.grad_norm),
                      "tokens_per_s": real_tokens / elapsed, "loss_tokens": int(metrics.tokens),
                      "epoch": reader.position.epoch}
            final_loss = loss
            if (settings.eval_every and step % settings.eval_every == 0) or step == total_steps:
                with distributed.collective(f"evaluating at step {step}"):
                    evaluation = evaluate()
                if evaluation:
                    record.update(evaluation)
                    eval_loss = evaluation["eval_loss"]
            metrics_log.write(record)
            if on_metrics:
                on_metrics(record)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if step % settings.checkpoint_every == 0 or step == total_steps:
                with distributed.collective(f"saving the checkpoint of step {step}"):
                    checkpoint()
                last_good = step
                distributed.set_resume_hint(f" from the checkpoint of step {step} in {checkpoints}")
    finally:
        stop.restore()
        bar.close()
        metrics_log.close()

    lora = distributed.fetch(state.lora)
    adapter = work_dir / "adapter"
    if team.is_leader:
        records = MetricsLog.records(metrics_log)
        if final_loss is None and records:  # resumed at the very end: report what the log holds
            final_loss = next((r["loss"] for r in reversed(records) if "loss" in r), None)
            eval_loss = next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None)
        save_adapter(adapter, lora, settings.lora, config, base_hash,
                     {"steps": step, "train_settings": settings.to_dict()})
        plot_loss(records, work_dir / "loss.png")
    team.barrier("jora: adapter written")  # the others return once the adapter is on disk
    return TrainResult(adapter, step, final_loss, eval_loss, resumed_from)

