"""The tensor name table (formats/names.py) against what each format really holds.

Oracles: the state dict of transformers' LlamaForCausalLM, the keys the Meta model.py port in
tests/oracles reads and the split dims its shard writer uses, PEFT's own adapter keys, and the
parameter tree Haiku builds from the model code. A table that contradicts itself is refused.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch

from jora_model.errors import JoraError
from jora_model.formats.layout import LINEAR_NAMES, param_specs, store_tensors
from jora_model.formats.names import LORA_LEAVES, TABLE, NameTable
from jora_model.model.config import LlamaConfig
from jora_model.parallel import sharding
from tests.oracles.checkpoints import (hf_to_meta_state_dict, meta_params, meta_split_dim, random_hf_llama,
                                       random_hf_llama_from_meta)
from tests.oracles.meta_llama import meta_logits

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


@pytest.fixture(scope="module")
def hf_model():
    c = CONFIG
    return random_hf_llama(c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, seed=0)


def test_the_table_is_consistent():
    TABLE.check()


def _row(store: str):
    return next(k for k in TABLE.kinds if k.store == store)


def _replace(store: str, **changes) -> NameTable:
    return NameTable(dataclasses.replace(k, **changes) if k.store == store else k for k in TABLE.kinds)


BROKEN = {
    "two rows share an HF name": lambda: _replace("attention.k_proj", hf="self_attn.q_proj.weight"),
    "two rows share a Meta name": lambda: _replace("mlp.up_proj", meta="feed_forward.w1.weight"),
    "two rows share a module": lambda: _replace("mlp.up_proj", module="layers/mlp/gate_proj"),
    "axes missing": lambda: _replace("mlp.down_proj", axes=("mlp",)),
    "axes swapped": lambda: _replace("mlp.down_proj", axes=("embed", "mlp")),
    "unknown axis": lambda: _replace("lm_head", axes=("embed", "vocabulary")),
    "split past the last dim": lambda: _replace("attention.o_proj", meta_split=2),
    "rotary over the wrong heads": lambda: _replace("attention.k_proj", rotary_heads="n_heads"),
    "LoRA on a norm": lambda: _replace("ffn_norm", lora=True),
    "LoRA target PEFT cannot find": lambda: _replace("mlp.gate_proj", hf="mlp.w1.weight"),
    "layers not one block": lambda: NameTable([*TABLE.kinds[:3], _row("final_norm"), *TABLE.kinds[3:-2],
                                               _row("lm_head")]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_row_is_refused(case):
    with pytest.raises(JoraError, match="contradicts itself"):
        BROKEN[case]().check()


def test_every_hf_name_maps_to_a_store_name_and_back(hf_model):
    state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    shapes = dict(store_tensors(CONFIG))
    for hf_name, tensor in state.items():
        kind, layer = TABLE.by_hf(hf_name)
        assert kind.hf_name(layer) == hf_name
        store_name = kind.store_name(layer)
        assert TABLE.by_store(store_name) == (kind, layer)
        expected = shapes[store_name][::-1] if kind.transposed else shapes[store_name]
        assert tuple(tensor.shape) == expected, hf_name
    assert set(state) == {kind.hf_name(layer) for kind, layer in TABLE.order(CONFIG.n_layers)}
    with pytest.raises(JoraError, match="not a Hugging Face tensor name"):
        TABLE.by_hf("model.layers.0.self_attn.qkv_proj.weight")


def test_every_meta_name_maps_to_a_store_name_and_back():
    params = meta_params(32, 2, 4, 2, 16)
    hf = random_hf_llama_from_meta(params, 64, seed=0)
    meta = hf_to_meta_state_dict(hf.state_dict(), 4, 2)
    names = {kind.meta_name(layer) for kind, layer in TABLE.order(params["n_layers"])}
    assert names == set(meta) - {"rope.freqs"}
    for meta_name in names:
        kind, layer = TABLE.by_meta(meta_name)
        assert kind.meta_name(layer) == meta_name
        assert kind.meta_split == meta_split_dim(meta_name), meta_name  # the oracle's shard writer
        assert TABLE.by_store(kind.store_name(layer)) == (kind, layer)
    # Meta's model code runs on exactly the tensors the table names (a missing one is a KeyError)
    tokens = torch.zeros((1, 3), dtype=torch.long)
    assert meta_logits({name: meta[name] for name in names}, params, tokens).shape == (1, 3, 64)
    rotary = {kind.meta: kind.rotary_heads for kind in TABLE.kinds if kind.rotary_heads}
    assert rotary == {"attention.wq.weight": "n_heads", "attention.wk.weight": "n_kv_heads"}


def test_peft_names_are_peft_own(hf_model):
    import peft

    model = peft.get_peft_model(hf_model, peft.LoraConfig(r=2, target_modules=list(LINEAR_NAMES)))
    theirs = set(peft.get_peft_model_state_dict(model))
    ours = {kind.peft_name(layer, leaf) for kind, layer in TABLE.order(CONFIG.n_layers) if kind.lora
            for leaf in LORA_LEAVES}
    assert ours == theirs
    model.unload()


def _haiku_tree() -> dict[str, tuple[int, ...]]:
    """"module/param" -> shape of every leaf the model code creates, LoRA on every linear layer."""
    from jora_model.model.llama import ModelOptions, transformed
    from jora_model.model.lora import LoraSettings

    lora = LoraSettings(r=3, targets=LINEAR_NAMES)
    model = transformed(CONFIG, ModelOptions(lora=lora))
    tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))
    return {f"{module}/{name}": leaf.shape for module, leaves in tree.items() for name, leaf in leaves.items()}


def test_sharding_rules_cover_the_model_tree_exactly():
    tree = _haiku_tree()
    assert set(tree) == set(sharding.param_rules())
    specs = {spec.path: spec.shape for spec in param_specs(CONFIG)}
    assert specs == {path: shape for path, shape in tree.items() if path in specs}
    for path, shape in tree.items():
        axes = sharding.logical_axes(path)
        assert len(axes) == len(shape), path
        assert set(axes) <= set(sharding.LOGICAL_TO_MESH), path
    for kind in TABLE.kinds:
        if kind.lora:
            *stack, fan_in, fan_out = kind.stacked_axes
            assert sharding.logical_axes(f"{kind.module}/lora_a") == (*stack, fan_in, "rank")
            assert sharding.logical_axes(f"{kind.module}/lora_b") == (*stack, "rank", fan_out)
    with pytest.raises(JoraError, match="no sharding rule for parameter 'layers/attention/qkv_proj/w'"):
        sharding.logical_axes("layers/attention/qkv_proj/w")


def test_store_names_follow_checkpoint_order():
    names = [name for name, _ in store_tensors(CONFIG)]
    assert names[0] == "embed" and names[-2:] == ["final_norm", "lm_head"]
    assert names[1:10] == [f"layers.0.{k.store}" for k in TABLE.kinds if k.per_layer]
    assert [TABLE.by_store(n)[0].store_name(TABLE.by_store(n)[1]) for n in names] == names
