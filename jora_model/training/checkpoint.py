"""Training checkpoints: the whole TrainState (adapter, optimizer state, step), the data reader's
position and the RNG seed, written so that a kill at any moment leaves only complete checkpoints.

Each checkpoint is a directory `ckpt-00000120/` with `state.safetensors` (every leaf of the state,
named by its path in the tree) and `state.json`. It is written under a temporary name, fsynced, and
renamed into place; the newest few are kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jora_model.errors import JoraError
from jora_model.formats.safetensors_io import SafetensorsFile, save_file

log = logging.getLogger("jora")
PREFIX = "ckpt-"


def _leaves_with_names(tree: Any) -> tuple[list[str], list[Any], Any]:
    import jax

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def save_checkpoint(directory: Path, state: Any, info: dict[str, Any], keep: int = 3,
                    settled: int | None = None) -> Path:
    """Write the checkpoint of info["step"]; keep the newest `keep`, and with `settled` also every one
    after that step and the newest at or before it: a divergence found later may condemn the ones after
    `settled` (DivergenceWatch.lookback), and then the newest one older than its onset must be there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = int(info["step"])
    final = checkpoint_path(directory, step)
    for stale in directory.glob(f".{PREFIX}*.tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    names, leaves, _ = _leaves_with_names(state)
    save_file(tmp / "state.safetensors", {n: np.asarray(leaf) for n, leaf in zip(names, leaves)})
    with open(tmp / "state.json", "w") as f:
        f.write(json.dumps(info, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    prune_checkpoints(directory, keep, settled)
    return final


def prune_checkpoints(directory: Path, keep: int, settled: int | None = None) -> None:
    """Remove all but the newest `keep` checkpoints and, with `settled`, those after it and the newest at
    or before it (save_checkpoint)."""
    existing = list_checkpoints(directory)
    kept = set(existing[-keep:])
    if settled is not None:
        kept.update(p for p in existing if checkpoint_step(p) > settled)
        kept.update([p for p in existing if checkpoint_step(p) <= settled][-1:])
    for old in existing:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and p.name[len(PREFIX):].isdigit())


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def checkpoint_info(directory: Path, step: int) -> dict[str, Any]:
    """The state.json of the checkpoint of `step` (the run's step, reader position, seed, ...)."""
    path = checkpoint_path(directory, step)
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise JoraError("unreadable checkpoint (state.json)", path) from None


def load_checkpoint(path: Path, template: Any, shardings: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restore a state shaped like `template` (an abstract or real TrainState), placed by `shardings`."""
    import jax

    path = Path(path)
    try:
        info = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise JoraError("unreadable checkpoint (state.json)", path) from None
    names, leaves, treedef = _leaves_with_names(template)
    restored = []
    with SafetensorsFile(path / "state.safetensors") as f:
        for name, leaf in zip(names, leaves):
            if name not in f:
                raise JoraError(f"checkpoint lacks {name} (made with other settings?)", path)
            value = f.read(name)
            if tuple(value.shape) != tuple(leaf.shape):
                raise JoraError(f"checkpoint's {name} has shape {value.shape}, expected {leaf.shape}", path)
            restored.append(value.astype(leaf.dtype))
    state = jax.tree_util.tree_unflatten(treedef, restored)
    if shardings is not None:
        from jora_model.parallel.distributed import place

        state = place(state, shardings)  # each device takes its slice (also across processes)
    return state, info


def latest_checkpoint(directory: Path, template: Any, shardings: Any = None) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that loads; a damaged one is reported and skipped, never deleted."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, template, shardings)
        except JoraError as exc:
            log.warning("skipping checkpoint %s: %s", path.name, exc)
    return None


def checkpoint_path(directory: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (processes that did not choose it load it from here)."""
    return Path(directory) / f"{PREFIX}{step:08d}"
