"""The seed library's Python entry points, kept for its users: `ParallamaConfig` (same field names
and defaults) and `train_lora(config, dataset, checkpoint_path)`.

`dataset` may be this library's `generate_alpaca_dataset(...)` result, or any map-style dataset
(anything with __len__ and __getitem__, a torch Dataset say) or iterable yielding Alpaca records
({"instruction", "input", "output"}), dicts with input_ids/loss_mask, or (input_ids, loss_mask) pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np

from jora_model.errors import JoraError


class ParallamaConfig(NamedTuple):
    JAX_PARAMS_PATH: str  # a jora parameter store (jora convert LLAMA2_META_PATH JAX_PARAMS_PATH)
    LLAMA2_META_PATH: str  # Meta's checkpoint directory, e.g. '/tmp/llama2-13B' (its tokenizer.model)
    MODEL_SIZE: str  # '7B', '13B', '70B'
    NUM_GPUS: int | None = None  # devices for tensor parallelism (None: all)
    LORA_R: int = 16
    LORA_ALPHA: int = 16
    LORA_DROPOUT: float = 0.05
    LR: float = 0.0001
    BATCH_SIZE: int = 1
    N_ACCUMULATION_STEPS: int = 8
    MAX_SEQ_LEN: int = 2000
    N_EPOCHS: int = 7
    SEED: int = 420


def config_tokenizer(config: ParallamaConfig) -> Path:
    """The tokenizer a seed config implies: the store's, else Meta's tokenizer.model."""
    from jora_model.data.tokenizer import resolve_tokenizer

    store = Path(config.JAX_PARAMS_PATH)
    if (store / "store.json").is_file():
        return resolve_tokenizer(store)
    return resolve_tokenizer(Path(config.LLAMA2_META_PATH) / "tokenizer.model")


def _examples(dataset: Any, tokenizer_path: Path, max_len: int) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
    from jora_model.data.alpaca import check_record, tokenize_record
    from jora_model.data.tokenizer import load_tokenizer

    tokenizer = None
    items = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__getitem__") and \
        hasattr(dataset, "__len__") else iter(dataset)
    for i, item in enumerate(items):
        if isinstance(item, dict) and "input_ids" in item:
            ids, mask = item["input_ids"], item["loss_mask"]
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            ids, mask = item
        elif isinstance(item, dict):
            problem = check_record(item)
            if problem:
                raise JoraError(f"dataset item {i}: {problem}")
            tokenizer = tokenizer or load_tokenizer(tokenizer_path)
            example = tokenize_record(tokenizer, item, i, max_len)
            if example.dropped:
                continue
            ids, mask = example.input_ids, example.loss_mask
        else:
            raise JoraError(f"dataset item {i} is a {type(item).__name__}: expected an Alpaca record, a dict with "
                            "input_ids and loss_mask, or an (input_ids, loss_mask) pair")
        ids, mask = np.asarray(ids, np.int32).reshape(-1), np.asarray(mask).astype(bool).reshape(-1)
        if ids.shape != mask.shape or not mask.any():
            raise JoraError(f"dataset item {i}: input_ids and loss_mask must have the same length and some targets")
        yield i, ids[:max_len], mask[:max_len]


def train_lora(config: ParallamaConfig, dataset: Any, checkpoint_path: str | Path):
    """Train an adapter as the seed library did; returns the TrainResult (adapter under
    checkpoint_path/adapter). Rerunning with the same checkpoint_path resumes."""
    from jora_model.model.config import preset
    from jora_model.data.shards import TOKENIZER_KEY, Row, ShardWriter
    from jora_model.model.lora import LoraSettings
    from jora_model.formats.store import Store
    from jora_model.training.trainer import TrainSettings, run_training

    store_path = Path(config.JAX_PARAMS_PATH)
    if not (store_path / "store.json").is_file():
        raise JoraError(f"no parameter store here; make it with: jora convert {config.LLAMA2_META_PATH} "
                        f"{config.JAX_PARAMS_PATH}", store_path)
    store = Store(store_path)
    expected = preset(config.MODEL_SIZE) if config.MODEL_SIZE else store.config  # "" skips the check
    if (store.config.dim, store.config.n_layers) != (expected.dim, expected.n_layers):
        raise JoraError(f"MODEL_SIZE {config.MODEL_SIZE} does not match the store (dim {store.config.dim}, "
                        f"{store.config.n_layers} layers)", store_path)
    checkpoint_path = Path(checkpoint_path)
    data_dir = checkpoint_path / "data"
    if not (data_dir / "train").is_dir():  # written once: a resumed run reads the same rows
        import hashlib

        tmp = checkpoint_path / ".data.partial"
        tokenizer = config_tokenizer(config)
        with open(tokenizer, "rb") as f:  # so train can check these ids are the store tokenizer's
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        writer = ShardWriter(tmp / "train", metadata={TOKENIZER_KEY: digest})
        for i, ids, mask in _examples(dataset, tokenizer, config.MAX_SEQ_LEN):
            writer.add(Row([i], ids, mask, np.ones(len(ids), np.int32)))
        writer.close()
        if writer.rows == 0:
            raise JoraError("the dataset has no usable examples")
        tmp.rename(data_dir)
    mesh = f"data=1,model={config.NUM_GPUS}" if config.NUM_GPUS else ""
    settings = TrainSettings(
        lora=LoraSettings(r=config.LORA_R, alpha=float(config.LORA_ALPHA), dropout=config.LORA_DROPOUT),
        lr=config.LR, batch_size=config.BATCH_SIZE, grad_accum=config.N_ACCUMULATION_STEPS,
        max_seq_len=config.MAX_SEQ_LEN, epochs=config.N_EPOCHS, seed=config.SEED, mesh=mesh)
    manifest = store_path / "jora-manifest.json"
    base_hash = json.loads(manifest.read_text()).get("key", "") if manifest.is_file() else ""
    return run_training(store_path, data_dir, checkpoint_path, settings, base_hash=base_hash)
