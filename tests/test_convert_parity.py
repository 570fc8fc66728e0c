"""Converted stores give the logits of the reference implementations.

Oracles: transformers' LlamaForCausalLM (fp32, eager attention) on the same weights, and for Meta's
layout the port of Meta's model.py in tests/oracles (which test_oracles.py ties to transformers).
Weights have std 1/sqrt(fan_in) so that a wrong q/k layout moves logits by O(1), not O(0.01).

Tolerance 1e-4 max abs: logits here are O(1..10) and both sides compute in fp32, so different
summation orders stay well inside it, while the layout bugs these tests exist for move logits by O(1)
(test_wrong_rotary_layout_is_caught checks that they do).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jora_model import load_model
from stages.convert import ConvertSettings, convert
from tests.conftest import VOCAB
from tests.oracles.checkpoints import (hf_to_meta_state_dict, meta_params, random_hf_llama,
                                       random_hf_llama_from_meta, write_hf_dir, write_meta_checkpoint)
from tests.oracles.logits import hf_logits, max_diff
from tests.oracles.meta_llama import meta_logits

TOL = 1e-4
FP32 = ConvertSettings(dtype="fp32")


def _tokens(batch: int = 2, seq: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq))


META_CASES = {
    "mha-1shard": (meta_params(64, 2, 4, None, 32), 1),
    "mha-2shards": (meta_params(64, 2, 4, None, 32), 2),
    "mha-4shards": (meta_params(64, 2, 4, None, 32), 4),
    "gqa-2shards": (meta_params(64, 2, 4, 2, 32), 2),
    "gqa-1shard-ffnmult": (meta_params(64, 2, 8, 2, 48, ffn_dim_multiplier=1.3, rope_theta=500.0), 1),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_layout_matches_transformers_and_meta(case, tmp_path, tokenizer_model):
    params, shards = META_CASES[case]
    hf = random_hf_llama_from_meta(params, VOCAB, seed=hash(case) % 1000)
    n_kv = params.get("n_kv_heads", params["n_heads"])
    meta_sd = hf_to_meta_state_dict(hf.state_dict(), params["n_heads"], n_kv,
                                    rope_theta=params.get("rope_theta", 10000.0))
    src = write_meta_checkpoint(tmp_path / "meta", meta_sd, params, shards, tokenizer_model)
    convert(src, tmp_path / "store", FP32, progress=False)

    model = load_model(tmp_path / "store")
    assert model.config.vocab_size == VOCAB and model.config.n_kv_heads == n_kv
    tokens = _tokens()
    ours = model.logits(tokens)
    assert ours.dtype == np.float32 and ours.shape == (2, 24, VOCAB)
    reference = hf_logits(hf, tokens)
    assert np.abs(reference).max() > 1.0  # logits large enough for the tolerance to mean something
    assert max_diff(ours, reference) < TOL
    meta = meta_logits(meta_sd, params, torch.as_tensor(tokens)).numpy()
    assert max_diff(ours, meta) < TOL


def test_wrong_rotary_layout_is_caught(tmp_path, tokenizer_model, monkeypatch):
    """Without the interleaved -> rotate-half permutation the logits are far off: the parity tests
    above would fail on exactly this bug."""
    import jora_model.formats.meta_checkpoint as meta_checkpoint

    params = meta_params(64, 2, 4, 2, 32)
    hf = random_hf_llama_from_meta(params, VOCAB, seed=7)
    meta_sd = hf_to_meta_state_dict(hf.state_dict(), 4, 2)
    src = write_meta_checkpoint(tmp_path / "meta", meta_sd, params, 2, tokenizer_model)
    tokens = _tokens()
    reference = hf_logits(hf, tokens)

    monkeypatch.setattr(meta_checkpoint, "interleaved_to_rotate_half", lambda w, n: w)
    convert(src, tmp_path / "unpermuted", FP32, progress=False)
    assert max_diff(load_model(tmp_path / "unpermuted").logits(tokens), reference) > 0.5

    # Permuting wk with the query-head count instead of the KV-head count: right shapes, wrong numbers.
    monkeypatch.undo()
    good = meta_checkpoint.interleaved_to_rotate_half
    monkeypatch.setattr(meta_checkpoint, "interleaved_to_rotate_half", lambda w, n: good(w, 4))
    convert(src, tmp_path / "wrong-kv", FP32, progress=False)
    assert max_diff(load_model(tmp_path / "wrong-kv").logits(tokens), reference) > 0.5


HF_CASES = {
    "single-file": dict(n_heads=4, n_kv_heads=4, shard=None, tie=False),
    "sharded-gqa": dict(n_heads=4, n_kv_heads=2, shard="60KB", tie=False),
    "tied-head": dict(n_heads=4, n_kv_heads=1, shard=None, tie=True),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_directory_matches_transformers(case, tmp_path, tokenizer_model):
    c = HF_CASES[case]
    hf = random_hf_llama(VOCAB, 64, 2, c["n_heads"], c["n_kv_heads"], 96, rope_theta=10000.0, seed=3,
                         tie=c["tie"])
    src = write_hf_dir(hf, tmp_path / "hf", tokenizer_model, max_shard_size=c["shard"])
    if c["shard"]:
        assert (src / "model.safetensors.index.json").is_file()
    convert(src, tmp_path / "store", FP32, progress=False)
    tokens = _tokens(seq=20, seed=1)
    assert max_diff(load_model(tmp_path / "store").logits(tokens), hf_logits(hf, tokens)) < TOL


def test_bf16_store_keeps_bf16_weights_and_matches_rounded_reference(tmp_path, tokenizer_model):
    """--dtype bf16 stores bf16; computed in fp32 it equals transformers on bf16-rounded weights."""
    hf = random_hf_llama(VOCAB, 64, 2, 4, 2, 96, seed=5)
    src = write_hf_dir(hf, tmp_path / "hf", tokenizer_model)
    convert(src, tmp_path / "store", ConvertSettings(dtype="bf16"), progress=False)
    model = load_model(tmp_path / "store", dtype="float32")
    leaves = [leaf for module in model.params.values() for leaf in module.values()]
    assert {str(leaf.dtype) for leaf in leaves} == {"bfloat16"}
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    tokens = _tokens(seed=2)
    assert max_diff(model.logits(tokens), hf_logits(hf, tokens)) < TOL


def test_packed_segments_equal_separate_sequences(tmp_path, tokenizer_model):
    """Two examples packed in one row with segment ids give each example's unpacked logits."""
    hf = random_hf_llama(VOCAB, 64, 2, 4, 2, 96, seed=9)
    convert(write_hf_dir(hf, tmp_path / "hf"), tmp_path / "store", FP32, progress=False)
    model = load_model(tmp_path / "store")
    a, b = _tokens(1, 10, seed=3), _tokens(1, 14, seed=4)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 10 + [2] * 14])
    out = model.logits(packed, segment_ids=segments)
    assert max_diff(out[:, :10], hf_logits(hf, a)) < TOL
    assert max_diff(out[:, 10:], hf_logits(hf, b)) < TOL
    # and without segment ids the second example would see the first
    assert max_diff(model.logits(packed)[:, 10:], hf_logits(hf, b)) > 0.1
