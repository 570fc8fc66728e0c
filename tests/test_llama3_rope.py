"""Llama 3.1's scaled rotary ("llama3" rope scaling), end to end, against transformers.

Oracles: transformers' LlamaForCausalLM (fp32, eager attention) built with rope_parameters of type
llama3, its config reader on our exported config.json, and its greedy generate. The original context
is 128 here instead of Llama 3.1's 8192, so that with head dim 32 and rope_theta 500000 the scaling
stretches most frequencies and blends two of them, all of which matter within a 288-token sequence.

Tolerance 1e-4 max abs, as in test_convert_parity.py: both sides compute in fp32 and logits are O(1..10);
our inverse frequencies differ from transformers' by float32 rounding (about 1e-7 relative), which over
288 positions moves an angle by under 1e-4 radians. Dropping the scaling, or mis-blending the middle band,
moves the logits far more (checked below), so the tolerance separates right from wrong.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import jora_model.model.llama as llama
from jora_model import load_model
from jora_model.api import LoadedModel
from jora_model.errors import JoraError
from jora_model.model.config import read_hf_config, read_meta_params
from jora_model.model.generate import Generator, SamplingSettings
from stages.convert import ConvertSettings, convert
from stages.export import export
from tests.conftest import VOCAB
from tests.oracles.checkpoints import hf_to_meta_state_dict, random_hf_llama, write_hf_dir, write_meta_checkpoint
from tests.oracles.logits import hf_logits, max_diff
from tests.oracles.meta_llama import apply_scaling, meta_logits

TOL = 1e-4
SEQ = 288
# what a config without scaling holds (the other rope settings back at their defaults)
PLAIN = {"rope_scaling_factor": None, "rope_original_max_len": 8192}
SCALING = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


def _scaled_hf_llama(seed: int = 11, scaling: dict = SCALING, ffn_dim: int = 192):
    """random_hf_llama's weights (dim 128, 4 query heads, 2 KV heads) in a model with llama3 rotary."""
    plain = random_hf_llama(VOCAB, 128, 2, 4, 2, ffn_dim, rope_theta=500000.0, seed=seed)
    config = plain.config
    config.rope_parameters = dict(scaling)
    config.max_position_embeddings = 16 * scaling["original_max_position_embeddings"]  # as 3.1's 8192 -> 131072
    scaled = transformers.LlamaForCausalLM(config)
    scaled.load_state_dict(plain.state_dict())
    return scaled.float().eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("llama3-rope")
    hf = _scaled_hf_llama()
    src = write_hf_dir(hf, root / "hf", tokenizer_model)
    convert(src, root / "store", ConvertSettings(dtype="fp32"), progress=False)
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=(1, SEQ))
    return root, hf, load_model(root / "store"), tokens, hf_logits(hf, tokens)


def test_the_converted_config_carries_the_scaling(converted):
    _, hf, model, _, _ = converted
    c = model.config
    assert (c.rope_scaling_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_len,
            c.rope_theta, c.n_kv_heads) == (8.0, 1.0, 4.0, 128, 500000.0, 2)
    # transformers' own frequencies, from the reference model itself
    theirs = hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(llama.rope_inv_freq(c), theirs, rtol=1e-6)
    plain = llama.rope_inv_freq(c.replace(**PLAIN))
    stretched = np.isclose(theirs, plain / 8, rtol=1e-6)
    kept = np.isclose(theirs, plain, rtol=1e-6)
    assert (stretched.sum(), kept.sum(), (~stretched & ~kept).sum()) == (12, 2, 2)  # two blended


def test_logits_match_transformers_on_long_sequences(converted):
    _, _, model, tokens, reference = converted
    ours = model.logits(tokens)
    assert ours.shape == (1, SEQ, VOCAB) and np.abs(reference).max() > 1.0
    assert max_diff(ours, reference) < TOL


def test_dropping_the_scaling_is_caught(converted):
    _, _, model, tokens, reference = converted
    plain = LoadedModel(model.config.replace(**PLAIN), model.params, "float32")
    assert max_diff(plain.logits(tokens), reference) > 0.1


def test_a_wrong_middle_band_is_caught(converted, monkeypatch):
    """Meta's and transformers' blend for the band between the two wavelengths, replaced by a plain
    division by the factor: only two of sixteen frequencies change, and the comparison still fails."""
    _, _, model, tokens, reference = converted
    good = llama.rope_inv_freq

    def no_blend(config):
        plain = good(config.replace(**PLAIN))
        wavelen = 2 * np.pi / plain
        return np.where(wavelen < config.rope_original_max_len / config.rope_high_freq_factor, plain,
                        plain / config.rope_scaling_factor).astype(np.float32)

    monkeypatch.setattr(llama, "rope_inv_freq", no_blend)
    wrong = LoadedModel(model.config, model.params, "float32")
    assert max_diff(wrong.logits(tokens), reference) > 100 * TOL


def test_generation_past_the_original_context_matches_transformers(converted):
    """The cached (generation) path uses the same scaled tables: greedy tokens equal transformers'."""
    _, hf, model, tokens, _ = converted
    prompt = [1] + tokens[0, :150].tolist()
    mine = Generator(model).generate(prompt, SamplingSettings(max_new_tokens=12), eos_id=None)
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert mine == theirs


def test_export_writes_llama3_rope_that_transformers_reads(converted):
    root, hf, model, tokens, reference = converted
    out = export(root / "store", root / "export", dtype="fp32").out_dir  # runs its own logits self-check
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"] == {k: v for k, v in SCALING.items() if k != "rope_theta"}
    assert written["rope_parameters"] == SCALING and written["rope_theta"] == 500000.0
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    np.testing.assert_allclose(loaded.model.rotary_emb.inv_freq.numpy(), hf.model.rotary_emb.inv_freq.numpy())
    assert max_diff(hf_logits(loaded, tokens), model.logits(tokens)) < TOL
    assert read_hf_config(out / "config.json")[0] == model.config


def test_meta_params_use_scaled_rope_reads_as_the_hf_config(tmp_path):
    """Llama 3.1 8B's params.json and its HF config.json give the same settings."""
    (tmp_path / "params.json").write_text(json.dumps({
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
        "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
        "use_scaled_rope": True}))
    hf = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf.save_pretrained(tmp_path)
    from_hf, _ = read_hf_config(tmp_path / "config.json")
    from_meta = read_meta_params(tmp_path / "params.json")
    assert from_meta == from_hf.replace(max_seq_len=from_meta.max_seq_len)
    assert from_meta.rope_scaling_factor == 8.0 and from_meta.rope_original_max_len == 8192


@pytest.mark.parametrize("factor,high", [(8.0, 4.0), (32.0, 4.0), (8.0, 2.0)])
def test_inverse_frequencies_equal_metas_apply_scaling(factor, high):
    """Llama 3.1 8B's head dim and theta, 3.2's factor 32, and a params.json high_freq_factor."""
    from jora_model.model.config import PRESETS

    config = PRESETS["7B"].replace(rope_theta=500000.0, rope_scaling_factor=factor, rope_high_freq_factor=high)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2)[:64].float() / 128))
    np.testing.assert_allclose(llama.rope_inv_freq(config), apply_scaling(freqs, factor, high).numpy(), rtol=1e-6)


def test_meta_layout_with_use_scaled_rope_matches_meta_and_transformers(tmp_path, tokenizer_model):
    """Meta's fixed original context (8192) stretches the lowest frequencies only; 512 tokens make
    that visible, and the check that dropping it is caught shows it is."""
    llama31 = {**SCALING, "original_max_position_embeddings": 8192}
    # 384: Meta's FFN formula for dim 128 and multiple_of 64
    hf = _scaled_hf_llama(seed=12, scaling=llama31, ffn_dim=384)
    state = hf_to_meta_state_dict(hf.state_dict(), 4, 2, rope_theta=500000.0)
    params = {"dim": 128, "multiple_of": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-5,
              "rope_theta": 500000.0}
    src = write_meta_checkpoint(tmp_path / "meta", state, params, 2, tokenizer_model)
    params.update(use_scaled_rope=True, vocab_size=VOCAB)
    (src / "params.json").write_text(json.dumps(params))
    convert(src, tmp_path / "store", ConvertSettings(dtype="fp32"), progress=False)
    model = load_model(tmp_path / "store")
    write_hf_dir(hf, tmp_path / "hf")
    # params.json has no context length: Meta's for Llama 3.1 (131072), as the HF config says
    assert model.config == read_hf_config(tmp_path / "hf" / "config.json")[0] and model.config.max_seq_len == 131072
    tokens = np.random.default_rng(5).integers(3, VOCAB, size=(1, 512))
    ours, reference = model.logits(tokens), hf_logits(hf, tokens)
    assert max_diff(ours, reference) < TOL
    assert max_diff(ours, meta_logits(state, params, torch.as_tensor(tokens)).numpy()) < TOL
    plain = LoadedModel(model.config.replace(**PLAIN), model.params, "float32")
    assert max_diff(plain.logits(tokens), reference) > 100 * TOL


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic", "longrope"])
def test_other_rope_types_are_refused_in_one_line(tmp_path, converted, key, rope_type):
    src = tmp_path / "hf"
    shutil.copytree(converted[0] / "hf", src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    config[key] = {"rope_type": rope_type, "factor": 8.0, "rope_theta": 500000.0}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(JoraError) as info:
        convert(src, tmp_path / "store", ConvertSettings(dtype="fp32"), progress=False)
    message = str(info.value)
    assert "\n" not in message and str(src / "config.json") in message and repr(rope_type) in message
