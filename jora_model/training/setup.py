"""Everything a training run needs before its first step, checked and built once: the data and its
reader, the mesh, the step functions, the state (fresh or resumed from a checkpoint) and the frozen
base on the devices. The result is one frozen bundle for the loop and the hooks."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from jora_model.data.shards import BatchReader, BatchSettings, ReaderPosition, ShardSet
from jora_model.errors import JoraError
from jora_model.model.config import LlamaConfig
from jora_model.training.batches import check_token_ids, stack_batches
from jora_model.training.settings import TrainSettings

log = logging.getLogger("jora")


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    config: LlamaConfig
    mesh: Any
    fns: Any  # the step functions (jora_model.training.step)
    frozen: Any  # the base's weights, placed on the mesh
    reader: BatchReader  # positioned after the batches the starting state has seen
    val_dir: Path | None  # None: no val/ split, no evaluation
    total_steps: int
    checkpoints: Path
    state: Any  # the state to start from
    first_step: int  # the steps that state has taken
    resumed_from: int | None  # step of the checkpoint it came from


def mesh_shape(spec: str):
    import jax

    from jora_model.parallel.sharding import MeshShape

    if spec:
        return MeshShape.parse(spec)
    return MeshShape(data=1, model=len(jax.devices()))


def setup_training(store_path: Path, data_dir: Path, work_dir: Path, settings: TrainSettings,
                   init_adapter: Path | None, team: Any) -> TrainingSetup:
    from jora_model.formats.store import Store, load_params
    from jora_model.parallel import sharding

    store = Store(store_path)
    config: LlamaConfig = store.config
    if settings.max_seq_len > config.max_seq_len:
        raise JoraError(f"max_seq_len {settings.max_seq_len} is longer than the model allows ({config.max_seq_len})")
    train_dir = Path(data_dir) / "train"
    if not train_dir.is_dir():
        raise JoraError("no train/ split here (run jora tokenize first)", data_dir)
    shape = mesh_shape(settings.mesh)
    sharding.check_divisible(config, shape, settings.batch_size)
    mesh = sharding.make_mesh(shape, config=config)
    reader = _train_reader(train_dir, mesh, settings)
    check_tokenizer(reader.shards, store)
    val_dir = _checked_data(reader, train_dir, Path(data_dir) / "val", config, settings)
    total_steps = _count_steps(reader, settings)
    lora_init = _initial_lora(config, settings, init_adapter)
    fns = _step_functions(config, settings, total_steps, mesh)
    checkpoints = Path(work_dir) / "checkpoints"
    state, resumed_from = _resume_or_start(fns, checkpoints, reader, lora_init, team)
    first_step = int(state.step)
    if first_step < total_steps:
        _compile_first_step(fns, config, mesh, reader, settings, store.dtype.name)
    frozen = load_params(store, lambda path, shape: sharding.param_sharding(mesh, path, shape, config),
                         step_dtype=fns.frozen_dtype)
    store.close()
    return TrainingSetup(config, mesh, fns, frozen, reader, val_dir, total_steps, checkpoints, state, first_step,
                         resumed_from)


def _train_reader(train_dir: Path, mesh: Any, settings: TrainSettings) -> BatchReader:
    from jora_model.parallel import distributed, sharding

    batch_settings = BatchSettings(batch_size=settings.batch_size, seed=settings.seed,
                                   pad_multiple=settings.pad_multiple)
    # This process's rows of every global batch (all of them on one process): it reads only those.
    my_rows = distributed.local_rows(sharding.batch_sharding_2d(mesh), (settings.batch_size, 1))
    return BatchReader(train_dir, batch_settings, rows=my_rows)


def _checked_data(reader: BatchReader, train_dir: Path, val_dir: Path, config: LlamaConfig,
                  settings: TrainSettings) -> Path | None:
    """Checks both splits against the model; returns val_dir, or None when there is no val split."""
    longest = int(reader.shards.lengths().max())
    if longest > settings.max_seq_len:
        raise JoraError(f"the data has rows of {longest} tokens, more than max_seq_len {settings.max_seq_len}",
                        train_dir)
    check_token_ids(train_dir, config.vocab_size)
    if not (val_dir.is_dir() and any(val_dir.glob("part-*.arrow"))):
        return None
    check_token_ids(val_dir, config.vocab_size)
    return val_dir


def check_tokenizer(shards: ShardSet, store: Any) -> None:
    """Refuse ids made by another tokenizer than the store's: they fit its vocabulary, so nothing else
    would notice, and the model would learn other words than the data says."""
    import hashlib

    recorded = shards.tokenizer_sha256()
    if recorded is None:
        log.warning("%s: the shards record no tokenizer hash (an older jora made them): cannot check they "
                    "were tokenized with the model's tokenizer", shards.directory)
        return
    if store.tokenizer_path is None:
        log.warning("%s: the store has no tokenizer: cannot check the shards were tokenized with the model's",
                    store.path)
        return
    with open(store.tokenizer_path, "rb") as f:
        ours = hashlib.file_digest(f, "sha256").hexdigest()
    if recorded != ours:
        raise JoraError(f"tokenized with another tokenizer (sha256 {recorded[:16]}) than the store's "
                        f"{store.tokenizer_path} ({ours[:16]}); tokenize again with --tokenizer {store.path}",
                        shards.directory)


def _count_steps(reader: BatchReader, settings: TrainSettings) -> int:
    steps_per_epoch = reader.batches_per_epoch / settings.grad_accum
    total_steps = max(1, math.ceil(settings.epochs * steps_per_epoch))
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    return total_steps


def _initial_lora(config: LlamaConfig, settings: TrainSettings, init_adapter: Path | None) -> Any:
    """A fresh adapter, or one warm-started from an earlier one (same rank and targets)."""
    from jora_model.formats.adapter import load_adapter
    from jora_model.model.lora import init_lora_params

    if init_adapter is None:
        return init_lora_params(config, settings.lora, settings.seed)
    lora_init, lora_from, _ = load_adapter(init_adapter, config)
    if (lora_from.r, lora_from.targets) != (settings.lora.r, settings.lora.targets):
        raise JoraError(f"--init-adapter has r={lora_from.r}, targets {','.join(lora_from.targets)}; this run "
                        f"asks for r={settings.lora.r}, targets {','.join(settings.lora.targets)}", init_adapter)
    return lora_init


def _step_functions(config: LlamaConfig, settings: TrainSettings, total_steps: int, mesh: Any) -> Any:
    from jora_model.training.step import OptimizerSettings, make_step_functions

    optimizer = OptimizerSettings(lr=settings.lr, warmup_steps=round(settings.warmup_ratio * total_steps),
                                  total_steps=total_steps, weight_decay=settings.weight_decay,
                                  max_grad_norm=settings.max_grad_norm)
    return make_step_functions(config, settings.lora, optimizer, settings.compute_dtype, settings.remat,
                               settings.seed, mesh, kernels=settings.kernels)


def _resume_or_start(fns: Any, checkpoints: Path, reader: BatchReader, lora_init: Any,
                     team: Any) -> tuple[Any, int | None]:
    """The newest checkpoint's state (the reader moved to its position), or a fresh state."""
    from jora_model.parallel import distributed
    from jora_model.training.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint

    # Process 0 picks the newest checkpoint that loads and the others load the same one, so every
    # process resumes from the same step even if one of them sees the shared directory differently.
    resumed = latest_checkpoint(checkpoints, fns.abstract_state, fns.state_shardings) if team.is_leader else None
    resume_step = team.broadcast_int(int(resumed[1]["step"]) if resumed is not None else -1,
                                     "agreeing on the checkpoint to resume from")
    if resume_step >= 0 and resumed is None:
        resumed = load_checkpoint(checkpoint_path(checkpoints, resume_step), fns.abstract_state,
                                  fns.state_shardings)
    if resumed is None:
        return fns.init(distributed.place(lora_init, fns.state_shardings.lora)), None
    state, info = resumed
    reader.position = ReaderPosition(**info["reader"])
    resumed_from = int(info["step"])
    log.info("train: resuming from step %d (%s)", resumed_from, checkpoints)
    distributed.set_resume_hint(f" from the checkpoint of step {resumed_from} in {checkpoints}")
    return state, resumed_from


def _compile_first_step(fns: Any, config: LlamaConfig, mesh: Any, reader: BatchReader, settings: TrainSettings,
                        dtype: str) -> None:
    """Compile the first step before the weights are loaded, so that the compiler's working memory
    (a few hundred MB) and the weights never add up."""
    from jora_model.training.step import abstract_arguments

    prepare = getattr(fns.train_step, "prepare", None)  # AheadOfTime's; a wrapped step has none
    if prepare is None:
        return
    # A second reader from the same position gives the first batch's length without moving the real one.
    ahead = iter(BatchReader(reader.shards.directory, reader.settings, position=reader.position, rows=reader.rows))
    length = stack_batches([next(ahead) for _ in range(settings.grad_accum)])["input_ids"].shape[2]
    prepare(*abstract_arguments(config, fns, mesh, (settings.grad_accum, settings.batch_size, length), dtype))
