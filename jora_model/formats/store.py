"""The parameter store: a directory of size-bounded safetensors files plus `store.json`.

`store.json` holds the model settings, the stored dtype, the tokenizer file's name and which file
holds each tensor. Tensors are per layer (`layers.0.attention.q_proj`), matrices [in, out], rotary in
the rotate-half convention (names.py, layout.py). Writing streams tensor by tensor; reading maps the files and
copies only the slice a device owns, so a 70B store never has to fit in host RAM at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jora_model.model.config import LlamaConfig
from jora_model.errors import JoraError
from jora_model.formats.layout import ParamSpec, param_specs, store_tensors
from jora_model.formats.safetensors_io import PlannedWriter, SafetensorsFile, plan_shards, row_blocks

INDEX_NAME = "store.json"
FORMAT = "jora-param-store"
VERSION = 1
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
STORE_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def store_dtype(name: str) -> np.dtype:
    import ml_dtypes

    try:
        canonical = STORE_DTYPES[name]
    except KeyError:
        raise JoraError(f"unknown dtype {name!r}; choose bf16 or fp32") from None
    return np.dtype(ml_dtypes.bfloat16) if canonical == "bfloat16" else np.dtype(np.float32)


class StoreWriter:
    """Streams the tensors of one model into `out_dir`; `finish()` writes store.json last."""

    def __init__(self, out_dir: Path, config: LlamaConfig, dtype: str,
                 tokenizer: Path | None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 extra: dict[str, Any] | None = None):
        self.out_dir, self.config, self.dtype = Path(out_dir), config, store_dtype(dtype)
        self.tokenizer, self.extra = tokenizer, extra or {}
        entries = [(name, self.dtype, shape) for name, shape in store_tensors(config)]
        self.shapes = {name: shape for name, _, shape in entries}
        shards = plan_shards(entries, max_shard_bytes)
        self.weight_map: dict[str, str] = {}
        self._writers: list[PlannedWriter] = []
        self._writer_of: dict[str, PlannedWriter] = {}
        for i, shard in enumerate(shards):
            file_name = f"params-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = PlannedWriter(self.out_dir / file_name, shard, {"format": "np"})
            self._writers.append(writer)
            for name, _, _ in shard:
                self.weight_map[name] = file_name
                self._writer_of[name] = writer

    def write(self, name: str, array: np.ndarray, source: str | Path | None = None) -> None:
        """Store one tensor, cast to the store dtype; `source` names the file it came from, for errors."""
        expected = self.shapes.get(name)
        if expected is None:
            raise JoraError(f"unexpected tensor {name!r}", source)
        if tuple(array.shape) != expected:
            raise JoraError(f"{name} has shape {tuple(array.shape)} but the model settings say {expected}",
                            source)
        if not all(np.isfinite(block).all() for block in row_blocks(array)):
            raise JoraError(f"{name} contains NaN or infinite values", source)
        self._writer_of[name].write(name, array)  # cast block by block on the way to disk

    def finish(self) -> dict[str, Any]:
        for writer in self._writers:
            writer.close()
        tokenizer_name = None
        if self.tokenizer is not None:
            tokenizer_name = self.tokenizer.name
            shutil.copyfile(self.tokenizer, self.out_dir / tokenizer_name)
            from jora_model.data.tokenizer_files import tokenizer_companions

            for name, path in tokenizer_companions(self.tokenizer).items():  # bos/eos settings travel with it
                shutil.copyfile(path, self.out_dir / name)
        index = {
            "format": FORMAT, "version": VERSION, "config": self.config.to_dict(),
            "dtype": self.dtype.name, "tokenizer": tokenizer_name,
            "layout": {"matrices": "[in, out]", "rotary": "rotate_half", "layers": "one tensor per layer"},
            **self.extra, "weight_map": self.weight_map,
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
        return index


class Store:
    """A finished parameter store, opened for sliced reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise JoraError(f"not a jora parameter store (no {INDEX_NAME})", self.path)
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JoraError("corrupt store index (not JSON)", index_path) from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise JoraError(f"not a {FORMAT} v{VERSION} index", index_path)
        try:
            self.config = LlamaConfig.from_dict(index["config"])
        except JoraError as exc:
            raise JoraError(str(exc), index_path) from None
        self.index = index
        self.dtype = np.dtype(store_dtype(index["dtype"]))
        self.tokenizer_path = self.path / index["tokenizer"] if index.get("tokenizer") else None
        self.weight_map: dict[str, str] = index["weight_map"]
        missing = [name for name, _ in store_tensors(self.config) if name not in self.weight_map]
        if missing:
            raise JoraError(f"store index lacks {len(missing)} tensors (first: {missing[0]})", index_path)
        self._files: dict[str, SafetensorsFile] = {}

    def _file(self, name: str) -> SafetensorsFile:
        file_name = self.weight_map[name]
        if file_name not in self._files:
            self._files[file_name] = SafetensorsFile(self.path / file_name)
        return self._files[file_name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        return self._file(name).read(name, index)

    def read_param(self, spec: ParamSpec, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """One leaf of the Haiku tree, or its `index` slice; stacked leaves are assembled layer by layer."""
        if index is None:
            index = tuple(slice(None) for _ in spec.shape)
        if not spec.stacked:
            return self.read(spec.store_keys[0], index)
        layers = range(*index[0].indices(spec.shape[0]))
        first = self.read(spec.store_keys[layers[0]], index[1:])
        out = np.empty((len(layers), *first.shape), first.dtype)
        out[0] = first
        for j, layer in enumerate(layers[1:], start=1):
            out[j] = self.read(spec.store_keys[layer], index[1:])
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


ShardingFor = Callable[[str, tuple[int, ...]], Any]  # (param path, shape) -> jax.sharding.Sharding


def load_params(store: Store, sharding_for: ShardingFor | None = None,
                step_dtype: Callable[[np.dtype, bool], np.dtype] | None = None) -> dict[str, dict[str, Any]]:
    """The Haiku parameter tree, each leaf placed by `sharding_for(path, shape)` (default: the first
    device). Every device receives only the slice its sharding gives it, read straight from the files.
    step_dtype(stored dtype, stacked): the dtype of the same bytes that the train step takes a tensor
    in (the kernel set's `frozen_dtype`); reinterpreting them on the host costs nothing."""
    import jax

    if sharding_for is None:
        device = jax.devices()[0]
        sharding_for = lambda path, shape: jax.sharding.SingleDeviceSharding(device)  # noqa: E731
    params: dict[str, dict[str, Any]] = {}
    for spec in param_specs(store.config):
        sharding = sharding_for(spec.path, spec.shape)
        def read(index, spec=spec):
            data = store.read_param(spec, index)
            return data.view(step_dtype(data.dtype, spec.stacked)) if step_dtype else data

        array = jax.make_array_from_callback(spec.shape, sharding, read)
        params.setdefault(spec.module, {})[spec.name] = array
    return params
