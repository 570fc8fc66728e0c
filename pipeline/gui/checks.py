"""Checks the page runs before Launch: each problem is reported against the field that causes it, and
nothing is launched while any remain.

They catch before a run starts what the stages would otherwise stop on minutes into it: paths that do
not exist, a checkpoint that is neither Meta's nor Hugging Face's layout, a mesh that does not divide
the model's heads (the same `check_divisible` the trainer applies), and, once jora_model.training.memory_plan
exists, a model that does not fit the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from jora_model.model.config import LlamaConfig, read_hf_config, read_meta_params
from jora_model.errors import JoraError
from pipeline.settings import FinetuneSettings, build


def _reason(exc: JoraError) -> str:
    """The message without the path prefix: the error is shown next to the field that holds the path."""
    text = str(exc)
    prefix = f"{exc.path}: " if exc.path is not None else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def checkpoint_tokenizer(checkpoint: Path, tokenizer: str | None) -> Path | None:
    """The tokenizer the convert stage will store: the one given, else the checkpoint's own."""
    if tokenizer:
        return Path(tokenizer)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (checkpoint / name).is_file():
            return checkpoint / name
    return None


def checkpoint_config(checkpoint: Path, tokenizer: Path | None) -> LlamaConfig:
    """The model's shape from its settings file alone (no weights are read). Meta's params.json says
    vocab_size -1 for Llama-2: the tokenizer gives the size then, as it does for Meta's own model.py."""
    from stages.convert import detect_layout

    if detect_layout(checkpoint) == "hf":
        return read_hf_config(checkpoint / "config.json")[0]
    vocab = None
    if tokenizer is not None and tokenizer.is_file():
        from jora_model.data.tokenizer_files import tokenizer_vocab_size

        vocab = tokenizer_vocab_size(tokenizer)
    return read_meta_params(checkpoint / "params.json", vocab_size=vocab)


@dataclasses.dataclass(frozen=True)
class Machine:
    devices: int  # devices JAX sees: a mesh must use all of them
    device_memory: int | None  # bytes each device holds (an accelerator's limit, or the host's RAM shared
    # by its CPU devices); None: unknown, and memory is not checked


_PROBE = """
import json, os, jax
devices = jax.devices()
memory = (devices[0].memory_stats() or {}).get("bytes_limit")
if memory is None and devices[0].platform == "cpu":
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
print(json.dumps({"devices": len(devices), "device_memory": memory}))
"""


@functools.cache
def this_machine() -> Machine:
    """The devices a run will see, asked in a child process with the run's environment: the page's own
    process never opens the accelerator (on a GPU it would hold memory the run needs)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=180)
    try:
        return Machine(**json.loads(out.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        raise JoraError("could not ask JAX for this machine's devices: "
                        + (out.stderr.strip().splitlines() or ["no output"])[-1]) from None


def check_settings(settings: FinetuneSettings, machine: Machine | None = None) -> dict[str, str]:
    """Problems with `settings` (paths already absolute), by dotted field name; empty when it may run.
    machine: the devices to plan for (default: this machine's, asked once)."""
    errors: dict[str, str] = {}
    work = Path(settings.workdir)
    if work.exists() and not work.is_dir():
        errors["workdir"] = "exists and is not a directory"
    elif not work.exists() and not work.parent.is_dir():
        errors["workdir"] = f"cannot be made: {work.parent} does not exist"

    config = None
    checkpoint = Path(settings.model.checkpoint) if settings.model.checkpoint else None
    tokenizer = None
    if checkpoint is None:
        errors["model.checkpoint"] = "give a checkpoint directory (Meta's download or a Hugging Face Llama)"
    elif not checkpoint.is_dir():
        errors["model.checkpoint"] = f"directory not found: {checkpoint}"
    if settings.model.tokenizer and not Path(settings.model.tokenizer).is_file():
        errors["model.tokenizer"] = f"file not found: {settings.model.tokenizer}"
    if "model.checkpoint" not in errors and checkpoint is not None:
        tokenizer = checkpoint_tokenizer(checkpoint, settings.model.tokenizer)
        if tokenizer is None:
            errors["model.tokenizer"] = f"{checkpoint} has no tokenizer.model or tokenizer.json; give one here"
        try:
            config = checkpoint_config(checkpoint, tokenizer if "model.tokenizer" not in errors else None)
        except JoraError as exc:
            errors["model.checkpoint"] = _reason(exc)

    if not settings.data.path:
        errors["data.path"] = "give an Alpaca JSON or JSON Lines file"
    elif not Path(settings.data.path).is_file():
        errors["data.path"] = f"file not found: {settings.data.path}"
    if config is not None and settings.data.max_seq_len > config.max_seq_len:
        errors["data.max_seq_len"] = f"longer than the model allows ({config.max_seq_len})"

    try:
        machine = machine or this_machine()
    except JoraError as exc:
        errors["train.mesh"] = str(exc)
        return errors
    # Several hosts (train.num_processes) train as one mesh over all their devices, as many on each.
    hosts = getattr(settings.train, "num_processes", None) or 1
    mesh = _check_mesh(settings, config, machine.devices * hosts, errors)
    if mesh is not None and config is not None and not errors and machine.device_memory:
        _check_memory(settings, config, mesh, machine.device_memory, errors)
    return errors


def _check_mesh(settings: FinetuneSettings, config: LlamaConfig | None, available: int, errors: dict[str, str]):
    from jora_model.parallel.sharding import MeshShape, check_divisible

    # The shape's own problems first (they hold on any machine), then whether this machine has the devices.
    try:
        given = MeshShape.parse(settings.train.mesh) if settings.train.mesh else None
        if given is not None and config is not None:
            check_divisible(config, given)
        mesh = given or MeshShape(1, available)
        if given is None and config is not None:
            check_divisible(config, mesh)
    except JoraError as exc:
        errors["train.mesh"] = _reason(exc)
        return None
    if mesh.size != available:
        errors["train.mesh"] = f"{mesh} needs {mesh.size} devices, but {available} are available"
        return None
    if settings.train.batch_size % mesh.data:
        errors["train.batch_size"] = f"must be a multiple of the mesh's data={mesh.data}"
    return mesh


def _check_memory(settings: FinetuneSettings, config: LlamaConfig, mesh, device_memory: int,
                  errors: dict[str, str]) -> None:
    """jora_model.training.memory_plan's estimate of the bytes per device (what `jora plan` reports), when that
    module exists; it is computed from shapes alone, on the CPU (see app.py)."""
    if importlib.util.find_spec("jora_model.training.memory_plan") is None:
        return
    from jora_model.model.lora import LoraSettings
    from jora_model.training.memory_plan import plan_memory

    t = settings.train
    plan = plan_memory(config, seq_len=settings.data.max_seq_len, batch_size=t.batch_size, mesh=mesh,
                       lora=build(LoraSettings, settings.lora), remat=t.remat,
                       param_dtype={"bf16": "bfloat16", "fp32": "float32"}[settings.model.dtype],
                       device_memory=device_memory, grad_accum=t.grad_accum,
                       kernels="cpu" if t.kernels == "auto" else t.kernels)  # as jora plan counts auto
    if plan.fits is False:
        errors["train.mesh"] = (f"does not fit: about {plan.total_bytes_per_device / 2 ** 30:.1f} GiB per device "
                                f"with {mesh}, batch {t.batch_size} of {settings.data.max_seq_len} tokens, but a "
                                f"device holds {device_memory / 2 ** 30:.1f} GiB (more model-parallel devices, "
                                "a smaller batch or max_seq_len, or remat layer)")
