"""A trained adapter on disk: `adapter.safetensors` (fp32, one A and B per layer and target,
`layers.3.attention.q_proj.lora_a` [in, r], `.lora_b` [r, out]) and `adapter.json` (LoRA settings,
the base model's settings and the hash of the store it was trained on)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from jora_model.errors import JoraError
from jora_model.formats.names import LORA_LEAVES, TABLE
from jora_model.formats.safetensors_io import SafetensorsFile, save_file
from jora_model.model.config import LlamaConfig
from jora_model.model.lora import LoraSettings, target_specs

WEIGHTS = "adapter.safetensors"
SETTINGS = "adapter.json"
# What train records as base_hash: a store's stage key with its build id (`KEY.BUILD`), or a bare key / hash
# of store.json for a store jora did not make. Anything else was written by a library caller as a label.
_HASH = re.compile(r"[0-9a-f]{64}(\.[0-9a-f]{32})?")
log = logging.getLogger("jora")


def save_adapter(directory: Path, lora_params: dict[str, dict[str, Any]], lora: LoraSettings,
                 config: LlamaConfig, base_hash: str, extra: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for module, leaves in sorted(lora_params.items()):
        kind = TABLE.by_module(module)
        for name in LORA_LEAVES:
            stacked = np.asarray(leaves[name], np.float32)
            for layer in range(stacked.shape[0]):
                tensors[kind.adapter_name(layer, name)] = stacked[layer]
    save_file(directory / WEIGHTS, tensors, {"format": "jora-adapter"})
    meta = {"format": "jora-adapter", "version": 1, "lora": lora.to_dict(), "base_config": config.to_dict(),
            "base_hash": base_hash, **(extra or {})}
    (directory / SETTINGS).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def adapter_dir(path: Path) -> Path:
    """A train stage output or its adapter/ directory -> the directory holding adapter.json."""
    path = Path(path)
    if not path.exists():
        raise JoraError("adapter not found", path)
    for candidate in (path, path / "adapter"):
        if (candidate / SETTINGS).is_file():
            return candidate
    raise JoraError(f"not a jora adapter (no {SETTINGS} here or in adapter/)", path)


def load_adapter(path: Path, config: LlamaConfig | None = None) -> tuple[dict, LoraSettings, dict[str, Any]]:
    """(stacked LoRA params, settings, metadata); checks the adapter fits `config` when given."""
    directory = adapter_dir(path)
    try:
        meta = json.loads((directory / SETTINGS).read_text())
        lora = LoraSettings.from_dict(meta["lora"])
        base = LlamaConfig.from_dict(meta["base_config"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise JoraError("corrupt adapter settings", directory / SETTINGS) from None
    except JoraError as exc:  # settings that parse but make no sense (an unknown target, say)
        raise JoraError(str(exc), directory / SETTINGS) from None
    if config is not None and (base.dim, base.n_layers, base.n_heads, base.n_kv_heads, base.ffn_dim) != (
            config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim):
        raise JoraError("adapter was trained for a model of another shape "
                        f"(dim {base.dim}, {base.n_layers} layers vs dim {config.dim}, {config.n_layers} layers)",
                        directory)
    config = config or base
    params: dict[str, dict[str, np.ndarray]] = {}
    with SafetensorsFile(directory / WEIGHTS) as f:
        for module, (layers, fan_in, fan_out) in target_specs(config, lora):
            kind = TABLE.by_module(module)
            leaves = {}
            for name, shape in (("lora_a", (fan_in, lora.r)), ("lora_b", (lora.r, fan_out))):
                per_layer = []
                for layer in range(layers):
                    tensor_name = kind.adapter_name(layer, name)
                    if tensor_name not in f:
                        raise JoraError(f"adapter lacks {tensor_name}", directory / WEIGHTS)
                    value = f.read(tensor_name)
                    if value.shape != shape:
                        raise JoraError(f"{tensor_name} has shape {value.shape}, the model needs {shape}",
                                        directory / WEIGHTS)
                    per_layer.append(value.astype(np.float32))
                leaves[name] = np.stack(per_layer)
            params[module] = leaves
    return params, lora, meta


def check_base(adapter: Path, store: Path, store_hash: str, allow_other_base: bool = False) -> None:
    """Refuse an adapter trained on another base than `store` (whose identity is `store_hash`, as
    stages.base.upstream_key gives it): with the same shapes it would load and run, silently wrong.

    Only the stage key is compared, not the build id after it: `jora convert --force` rebuilds the same
    weights under a new build id, and the adapter still fits them. An adapter without a recorded hash
    (an older jora's; train outside a stage) is accepted with a warning; a base_hash that is no hash at all
    (a label a library caller chose) cannot be checked and is taken as it is."""
    directory = adapter_dir(adapter)
    try:
        recorded = json.loads((directory / SETTINGS).read_text()).get("base_hash")
    except (OSError, ValueError, AttributeError):
        raise JoraError("corrupt adapter settings", directory / SETTINGS) from None
    if not recorded:
        log.warning("%s records no base hash (an older jora made it): cannot check it was trained on %s",
                    directory, store)
        return
    if not isinstance(recorded, str) or not _HASH.fullmatch(recorded) or \
            recorded.split(".")[0] == store_hash.split(".")[0]:
        return
    problem = (f"adapter trained on base {recorded[:16]}, not on {store} ({store_hash[:16]})"
               + _merged_hint(store, recorded))
    if allow_other_base:
        log.warning("%s: %s; using it anyway (--allow-other-base)", directory, problem)
        return
    raise JoraError(f"{problem}; give the store it was trained on, or --allow-other-base to use it anyway",
                    directory)


def _merged_hint(store: Path, recorded: str) -> str:
    """What a store made by `jora merge` says about the mix-up: the adapter may already be in it."""
    try:
        merged = json.loads((Path(store) / "store.json").read_text()).get("merged")
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(merged, dict):
        return ""
    if str(merged.get("base", "")).split(".")[0] == recorded.split(".")[0]:
        return ("; that store is its base with an adapter merged in, maybe this one already "
                "(applying it again would add the update twice)")
    return "; that store has an adapter merged in already"
