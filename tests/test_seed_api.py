"""The seed library's entry points: ParallamaConfig, generate_alpaca_dataset, train_lora."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jora_model import JoraError, ParallamaConfig, generate_alpaca_dataset, load_model, train_lora
from tests.train_helpers import tiny_store

RECORDS = [{"instruction": "check the battery", "input": "", "output": "replace it"},
           {"instruction": "firmware update", "input": "robot aisle", "output": "update it"}] * 4


def test_seed_defaults_are_kept():
    config = ParallamaConfig(JAX_PARAMS_PATH="p", LLAMA2_META_PATH="m", MODEL_SIZE="7B")
    assert (config.LORA_R, config.LORA_ALPHA, config.LORA_DROPOUT, config.LR, config.BATCH_SIZE,
            config.N_ACCUMULATION_STEPS, config.MAX_SEQ_LEN, config.N_EPOCHS, config.SEED, config.NUM_GPUS) == \
        (16, 16, 0.05, 1e-4, 1, 8, 2000, 7, 420, None)


class PairDataset(torch.utils.data.Dataset):
    """A user's own map-style torch dataset yielding (input_ids, loss_mask) pairs."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        ids = torch.arange(1, 40) % 300 + i
        mask = torch.zeros(39, dtype=torch.bool)
        mask[20:] = True
        return ids, mask


@pytest.mark.parametrize("kind", ["alpaca-records", "library-dataset", "torch-pairs"])
def test_train_lora_accepts_the_seed_datasets(kind, tmp_path, tokenizer_model):
    _, store = tiny_store(tmp_path, tokenizer_model, dim=128, n_heads=4, n_kv_heads=4)
    config = ParallamaConfig(JAX_PARAMS_PATH=str(store), LLAMA2_META_PATH=str(tmp_path), MODEL_SIZE="tiny",
                             N_EPOCHS=1, N_ACCUMULATION_STEPS=2, MAX_SEQ_LEN=256, LORA_R=4)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(RECORDS))
    dataset = {"alpaca-records": RECORDS, "library-dataset": generate_alpaca_dataset(data, "train", config),
               "torch-pairs": PairDataset()}[kind]
    result = train_lora(config, dataset, tmp_path / "ckpt")
    assert result.steps >= 1 and (tmp_path / "ckpt" / "adapter" / "adapter.safetensors").is_file()
    logits = load_model(store, adapter=tmp_path / "ckpt").logits(np.ones((1, 8), int))
    assert np.isfinite(logits).all()


def test_train_lora_wants_a_converted_store_of_the_stated_size(tmp_path, tokenizer_model):
    config = ParallamaConfig(JAX_PARAMS_PATH=str(tmp_path / "none"), LLAMA2_META_PATH="/meta", MODEL_SIZE="7B")
    with pytest.raises(JoraError, match="jora convert /meta"):
        train_lora(config, RECORDS, tmp_path / "ckpt")
    _, store = tiny_store(tmp_path, tokenizer_model)
    with pytest.raises(JoraError, match="MODEL_SIZE 7B does not match"):
        train_lora(config._replace(JAX_PARAMS_PATH=str(store)), RECORDS, tmp_path / "ckpt")
