"""Folding a LoRA adapter into the base weights: W' = W + scale * A B, tensor by tensor.

The merge is computed in fp32 from the stored weight and the fp32 adapter, then cast to the store's
dtype, so only one tensor (and its fp32 copy) is in memory at a time. The scale comes from the
adapter's own LoraSettings (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA): the forward pass and the
merge read it from the same place and cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jora_model.formats.adapter import load_adapter
from jora_model.formats.layout import store_tensors
from jora_model.formats.names import TABLE
from jora_model.formats.store import Store, StoreWriter


def merged_tensors(store: Store, adapter_path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(store name, merged tensor) for every tensor of the store, in checkpoint order."""
    lora_params, lora, _ = load_adapter(adapter_path, store.config)
    updates: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for module, leaves in lora_params.items():
        kind = TABLE.by_module(module)
        for layer in range(store.config.n_layers):
            updates[kind.store_name(layer)] = (leaves["lora_a"], leaves["lora_b"], layer)
    for name, _ in store_tensors(store.config):
        weight = store.read(name)
        if name in updates:
            a, b, layer = updates[name]
            delta = lora.scale * (a[layer].astype(np.float32) @ b[layer].astype(np.float32))
            weight = (weight.astype(np.float32) + delta).astype(store.dtype)
        yield name, weight


def merge_store(store_path: Path, adapter_path: Path, out_dir: Path, extra: dict[str, Any] | None = None,
                progress: bool | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    store = Store(store_path)
    try:
        writer = StoreWriter(out_dir, store.config, store.dtype.name, store.tokenizer_path, extra=extra)
        for name, tensor in tqdm(merged_tensors(store, adapter_path), total=len(store_tensors(store.config)),
                                 unit="tensor", desc="merge", disable=(not progress) if progress is not None else None):
            writer.write(name, tensor)
        return writer.finish()
    finally:
        store.close()
