"""LoRA against PEFT, and the training step's arithmetic.

PEFT is the oracle for the adapter's semantics: our A/B are copied into a peft LoRA model on the same
base weights, and the logits must agree within 1e-4 (fp32; logits are O(1..10), observed gap ~1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jora_model import load_model
from jora_model.formats.adapter import load_adapter, save_adapter
from jora_model.model.lora import LoraSettings, init_lora_params, merge_params, split_params
from jora_model.formats.store import Store, load_params
from jora_model.training.step import OptimizerSettings, make_step_functions
from tests.train_helpers import tiny_store

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("lora")
    hf, store = tiny_store(root, tokenizer_model)
    return root, hf, store


def _tokens(seed=0, batch=2, seq=20):
    return np.random.default_rng(seed).integers(0, 320, size=(batch, seq))


def _random_adapter(config, lora, seed=1):
    """Nonzero B so the adapter actually changes the model."""
    params = init_lora_params(config, lora, seed)
    rng = np.random.default_rng(seed + 1)
    for leaves in params.values():
        leaves["lora_b"] = rng.normal(0, 0.3, leaves["lora_b"].shape).astype(np.float32)
    return params


def test_fresh_adapter_leaves_the_model_unchanged(base, tmp_path):
    root, hf, store = base
    config = Store(store).config
    lora = LoraSettings(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))
    save_adapter(tmp_path / "fresh", init_lora_params(config, lora, 0), lora, config, "x")
    tokens = _tokens()
    plain = load_model(store).logits(tokens)
    with_lora = load_model(store, adapter=tmp_path / "fresh").logits(tokens)
    np.testing.assert_array_equal(plain, with_lora)  # B = 0: exactly, not approximately


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_matches_peft(base, tmp_path, rslora):
    root, hf, store = base
    config = Store(store).config
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    lora = LoraSettings(r=4, alpha=12, dropout=0.1, targets=targets, rslora=rslora)  # alpha != r
    params = _random_adapter(config, lora)
    save_adapter(tmp_path / "a", params, lora, config, "x")
    ours = load_model(store, adapter=tmp_path / "a").logits(_tokens())

    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1,
                                                    target_modules=list(targets), use_rslora=rslora))
    model.eval()
    where = {"q_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn", "down_proj": "mlp"}
    with torch.no_grad():
        for name in targets:
            module_path = f"layers/{'attention' if where[name] == 'self_attn' else 'mlp'}/{name}"
            for i in range(config.n_layers):
                layer = getattr(model.base_model.model.model.layers[i], where[name])
                target = getattr(layer, name)
                target.lora_A["default"].weight.copy_(torch.from_numpy(params[module_path]["lora_a"][i].T))
                target.lora_B["default"].weight.copy_(torch.from_numpy(params[module_path]["lora_b"][i].T))
        reference = model(torch.as_tensor(_tokens())).logits.numpy()
    base_logits = load_model(store).logits(_tokens())
    assert np.abs(reference - base_logits).max() > 0.1  # the adapter matters
    assert np.abs(ours - reference).max() < TOL
    model.unload()


def test_adapter_round_trip_and_shape_check(base, tmp_path):
    root, hf, store = base
    config = Store(store).config
    lora = LoraSettings(r=3)
    params = _random_adapter(config, lora)
    save_adapter(tmp_path / "a", params, lora, config, "hash")
    loaded, settings, meta = load_adapter(tmp_path / "a", config)
    assert settings == lora and meta["base_hash"] == "hash"
    for module in params:
        for name in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(loaded[module][name], params[module][name])
    from jora_model.errors import JoraError

    with pytest.raises(JoraError, match="another shape"):
        load_adapter(tmp_path / "a", config.replace(dim=128, n_heads=8, n_kv_heads=4))


def _frozen(store):
    s = Store(store)
    try:
        return load_params(s)
    finally:
        s.close()


def _batch(tokens, accum, rows, first_target=None):
    ids = tokens.astype(np.int32)
    mask = np.zeros_like(ids, dtype=bool)
    for row, start in enumerate(first_target or [6] * len(ids)):
        mask[row, start:] = True
    shape = (accum, rows, ids.shape[-1])
    return {"input_ids": jnp.asarray(ids.reshape(shape)), "loss_mask": jnp.asarray(mask.reshape(shape)),
            "segment_ids": jnp.ones(shape, jnp.int32)}


def test_accumulation_equals_the_large_batch(base):
    """4 micro-batches of 1 == one batch of 4 (fp32), with a different number of targets in each row:
    the loss is normalised by the tokens of the whole accumulated batch."""
    root, hf, store = base
    config = Store(store).config
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    frozen = _frozen(store)
    tokens = _tokens(seed=3, batch=4, seq=24)
    results = []
    for accum, rows in ((4, 1), (1, 4)):
        fns = make_step_functions(config, lora, OptimizerSettings(lr=1e-2, total_steps=10), "float32", "none", 0)
        state = fns.init(_random_adapter(config, lora))
        state, metrics = fns.train_step(state, frozen, _batch(tokens, accum, rows, [10, 6, 15, 20]))
        results.append((jax.device_get(state.lora), metrics))
    (lora_a, m_a), (lora_b, m_b) = results
    assert float(m_a.tokens) == float(m_b.tokens) == 14 + 18 + 9 + 4
    assert abs(float(m_a.loss) - float(m_b.loss)) < 1e-5
    assert abs(float(m_a.grad_norm) - float(m_b.grad_norm)) < 1e-5 * max(1.0, float(m_b.grad_norm))
    for module in lora_a:
        for name in ("lora_a", "lora_b"):
            np.testing.assert_allclose(lora_a[module][name], lora_b[module][name], atol=1e-5)


def test_loss_falls_on_a_repeated_batch(base):
    root, hf, store = base
    config = Store(store).config
    lora = LoraSettings(r=8, alpha=16, dropout=0.05)
    frozen = _frozen(store)
    fns = make_step_functions(config, lora, OptimizerSettings(lr=3e-3, total_steps=40), "bfloat16", "matmuls", 0)
    state = fns.init(init_lora_params(config, lora, 0))
    batch = _batch(_tokens(seed=5, batch=2, seq=24), 1, 2)
    losses = []
    for _ in range(40):
        state, metrics = fns.train_step(state, frozen, batch)
        losses.append(float(metrics.loss))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses  # more than a nat per token


def test_trainable_and_frozen_are_separate_and_only_lora_gets_gradients(base):
    root, hf, store = base
    config = Store(store).config
    lora = LoraSettings(r=2)
    trainable = init_lora_params(config, lora, 0)
    frozen = _frozen(store)
    merged = merge_params(frozen, trainable)
    t2, f2 = split_params(merged)
    assert set(t2) == {"layers/attention/q_proj", "layers/attention/v_proj"}
    assert all(set(leaves) == {"lora_a", "lora_b"} for leaves in t2.values())
    assert not any(name.startswith("lora_") for leaves in f2.values() for name in leaves)
    fns = make_step_functions(config, lora, OptimizerSettings(), "float32", "none", 0)
    state = fns.init(trainable)
    assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(trainable)
