"""Llama 3.2 1B/3B's tied output head (logits = x @ embed.T), end to end, against code nobody here wrote.

Oracles: transformers' LlamaForCausalLM (fp32, eager attention) with tie_word_embeddings=True, llama3
rotary scaled by 32 and grouped-query attention; the port of Meta's model.py in tests/oracles, given
the embedding as its output weight (Meta's tied checkpoints hold no output.weight); transformers
again on our HF export after LoRA training and merge.

Tolerance 1e-4 max abs on fp32 logits of O(1..10), as in test_convert_parity.py and
test_llama3_rope.py: both sides compute in fp32, and summation order moves logits by about 1e-5. An
untied head (a random lm_head in place of the embedding) moves them by O(1), checked below.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jora_model.training.step as step_module
from jora_model import load_model
from jora_model.api import LoadedModel
from jora_model.errors import JoraError
from jora_model.formats.adapter import save_adapter
from jora_model.formats.layout import param_specs, store_tensors
from jora_model.formats.names import TABLE, NameTable
from jora_model.formats.store import Store, load_params
from jora_model.model.config import PRESETS
from jora_model.model.generate import Generator, SamplingSettings
from jora_model.model.lora import LoraSettings, init_lora_params
from jora_model.parallel.sharding import MeshShape
from jora_model.training import loss
from jora_model.training.loss import token_losses
from jora_model.training.memory_plan import frozen_shards, plan_memory
from jora_model.training.step import OptimizerSettings, make_step_functions
from stages.convert import ConvertSettings, convert
from stages.export import export
from stages.merge import merge
from tests.conftest import VOCAB
from tests.oracles.checkpoints import (hf_to_meta_state_dict, meta_params, random_hf_llama,
                                       random_hf_llama_from_meta, write_hf_dir, write_meta_checkpoint)
from tests.oracles.logits import hf_logits, max_diff
from tests.oracles.meta_llama import meta_logits
from tests.test_convert_stage import assert_clean_failure, run_cli

TOL = 1e-4
SEQ = 288
FP32 = ConvertSettings(dtype="fp32")
# Llama 3.2's rotary (factor 32) with the original context shrunk to 128 so that the scaling matters
# within SEQ tokens (see test_llama3_rope.py).
SCALING = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _head_scaled(hf):
    """The tied table at std 1/sqrt(D), as random_hf_llama gives an untied head: at its std 1 the
    logits reach O(100), where fp32 rounding alone approaches the tolerance; now they are O(1..10)."""
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(hf.config.hidden_size ** -0.5)
    return hf


def _tied_hf_llama(seed: int = 21):
    """A tiny tied Llama 3.2: dim 128, 4 query heads over 2 KV heads, llama3 rotary by 32."""
    plain = _head_scaled(random_hf_llama(VOCAB, 128, 2, 4, 2, 192, rope_theta=500000.0, seed=seed, tie=True))
    config = plain.config
    config.rope_parameters = dict(SCALING)
    config.max_position_embeddings = 16 * SCALING["original_max_position_embeddings"]
    tied = transformers.LlamaForCausalLM(config)
    tied.load_state_dict(plain.state_dict())
    tied = tied.float().eval()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    return tied


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("llama3-tied")
    hf = _tied_hf_llama()
    src = write_hf_dir(hf, root / "hf", tokenizer_model)
    convert(src, root / "store", FP32, progress=False)
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=(1, SEQ))
    return root, hf, load_model(root / "store"), tokens, hf_logits(hf, tokens)


def _untied(model: LoadedModel, seed: int = 0) -> LoadedModel:
    """The deliberate bug: the same weights with the head untied, a random lm_head in its place."""
    config = model.config.replace(tie_word_embeddings=False)
    head = np.random.default_rng(seed).normal(0, config.dim ** -0.5, (config.dim, config.vocab_size))
    return LoadedModel(config, {**model.params, "lm_head": {"w": jnp.asarray(head, jnp.float32)}}, "float32")


def test_hf_tied_checkpoint_converts_without_a_head_tensor(converted):
    root, _, model, _, _ = converted
    with open(root / "hf" / "model.safetensors", "rb") as f:  # save_pretrained drops the tied copy
        assert b"lm_head.weight" not in f.read(1 << 16)
    store = Store(root / "store")
    assert store.config.tie_word_embeddings and store.config.rope_scaling_factor == 32.0
    assert "lm_head" not in store.weight_map and "embed" in store.weight_map
    assert json.loads((root / "store" / "store.json").read_text())["config"]["tie_word_embeddings"] is True
    assert "lm_head" not in model.params and set(model.params) == {s.module for s in param_specs(store.config)}
    assert [name for name, _ in store_tensors(store.config)] == list(store.weight_map)


def test_tied_logits_match_transformers(converted):
    _, _, model, tokens, reference = converted
    ours = model.logits(tokens)
    assert ours.shape == (1, SEQ, VOCAB) and np.abs(reference).max() > 1.0
    assert max_diff(ours, reference) < TOL


def test_an_untied_head_is_caught(converted):
    _, _, model, tokens, reference = converted
    assert max_diff(_untied(model).logits(tokens), reference) > 1.0


def test_tied_generation_matches_transformers(converted):
    """The cached (generation) forward reads the embedding as its head too: greedy tokens agree."""
    _, hf, model, tokens, _ = converted
    prompt = [1] + tokens[0, :40].tolist()
    mine = Generator(model).generate(prompt, SamplingSettings(max_new_tokens=12), eos_id=None)
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert mine == theirs


# Llama 3's Meta layout: GQA, the embedding split on its rows, scaled rotary as params.json says it
PARAMS = meta_params(64, 2, 8, 4, 32, ffn_dim_multiplier=1.5, rope_theta=500000.0)
SCALED_PARAMS = {"use_scaled_rope": True, "rope_scaling_factor": 32.0}


def _meta_tied(tmp_path, tokenizer_model, shards: int, seed: int = 3, head: str = "absent"):
    """A tied Llama 3.2 in Meta's layout, and its state with the head spelled out (the oracle's input).
    head: "absent" (no output.weight) or "copy" (output.weight equal to the embedding)."""
    hf = _head_scaled(random_hf_llama_from_meta(PARAMS, VOCAB, seed=seed, tie=True))
    state = hf_to_meta_state_dict(hf.state_dict(), PARAMS["n_heads"], PARAMS["n_kv_heads"], rope_theta=500000.0)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    written = dict(state) if head == "copy" else {k: v for k, v in state.items() if k != "output.weight"}
    src = write_meta_checkpoint(tmp_path / f"meta-{shards}-{head}", written, PARAMS, shards, tokenizer_model,
                                llama3=True)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, **SCALED_PARAMS}))
    return src, state


@pytest.mark.parametrize("shards,head", [(1, "absent"), (2, "absent"), (2, "copy")])
def test_meta_tied_checkpoint_converts_and_matches_meta(tmp_path, tokenizer_model, shards, head):
    src, state = _meta_tied(tmp_path, tokenizer_model, shards, head=head)
    convert(src, tmp_path / "store", FP32, progress=False)
    model = load_model(tmp_path / "store")
    c = model.config
    assert (c.tie_word_embeddings, c.rope_scaling_factor, c.max_seq_len, c.n_kv_heads) == (True, 32.0, 131072, 4)
    assert "lm_head" not in Store(tmp_path / "store").weight_map
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, 256))
    reference = meta_logits(state, {**PARAMS, **SCALED_PARAMS, "vocab_size": VOCAB}, torch.as_tensor(tokens)).numpy()
    assert np.abs(reference).max() > 1.0
    assert max_diff(model.logits(tokens), reference) < TOL
    assert max_diff(_untied(model).logits(tokens), reference) > 1.0


def test_a_meta_head_that_differs_from_the_embedding_in_one_row_stays_untied(tmp_path, tokenizer_model):
    """Equality is checked on the whole table, not on its first rows."""
    hf = _head_scaled(random_hf_llama_from_meta(PARAMS, VOCAB, seed=4, tie=True))
    state = hf_to_meta_state_dict(hf.state_dict(), PARAMS["n_heads"], PARAMS["n_kv_heads"], rope_theta=500000.0)
    state["output.weight"] = state["output.weight"].clone()
    state["output.weight"][-1] += 1.0
    src = write_meta_checkpoint(tmp_path / "meta", state, PARAMS, 2, tokenizer_model, llama3=True)
    convert(src, tmp_path / "store", FP32, progress=False)
    model = load_model(tmp_path / "store")
    assert not model.config.tie_word_embeddings and "lm_head" in Store(tmp_path / "store").weight_map
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(1, 64))
    reference = meta_logits(state, {**PARAMS, "vocab_size": VOCAB}, torch.as_tensor(tokens)).numpy()
    assert max_diff(model.logits(tokens), reference) < TOL


def test_meta_shards_that_disagree_about_the_head_are_refused(tmp_path, tokenizer_model):
    src, state = _meta_tied(tmp_path, tokenizer_model, 2)
    shard = src / "consolidated.01.pth"
    pieces = torch.load(shard, weights_only=True)
    pieces["output.weight"] = state["output.weight"][VOCAB // 2:].clone()
    torch.save(pieces, shard)
    with pytest.raises(JoraError, match="output.weight not found") as info:
        convert(src, tmp_path / "store", FP32, progress=False)
    assert "consolidated.00.pth" in str(info.value) and not (tmp_path / "store").exists()


@pytest.mark.parametrize("kernels", ["cpu", "portable"])
def test_chunked_loss_on_the_tied_table_equals_the_full_logits_loss(kernels):
    """head_nll reading the [V, D] table as it lies (vocab_major) against the plain loss on the full
    logits hidden @ table.T, value and gradient, under jit as the step runs it."""
    rng = np.random.default_rng(4)
    b, t, d, vocab = 2, 24, 16, 50
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.7)
    segments = jnp.asarray([[1] * 10 + [2] * 10 + [0] * 4, [1] * 24])

    def plain(hidden):
        return token_losses(hidden @ table.T, ids, mask, segments)[0]

    def chunked(hidden):
        return loss.losses_from_hidden(hidden, table, ids, mask, segments, kernels, vocab_major=True)[0]

    np.testing.assert_allclose(chunked(hidden), plain(hidden), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(chunked))(hidden), jax.grad(plain)(hidden), rtol=1e-5, atol=1e-6)


def _batch(seed: int, rows: int = 2, length: int = 64) -> dict:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(1, rows, length)).astype(np.int32)
    mask = np.zeros_like(ids, dtype=bool)
    mask[..., 8:] = True
    return {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask), "segment_ids": jnp.ones_like(ids)}


def _hf_loss(hf, batch: dict) -> float:
    """Mean next-token NLL over the loss tokens, from transformers' logits."""
    ids = np.array(batch["input_ids"][0])
    nll, n = token_losses(jnp.asarray(hf_logits(hf, ids)), jnp.asarray(ids), batch["loss_mask"][0],
                          batch["segment_ids"][0])
    return float(nll / n)


@pytest.fixture(scope="module")
def trained(converted):
    """A few LoRA steps on the tied store (fp32): (root, lora settings, adapter dir, first step's loss)."""
    root, hf, model, _, _ = converted
    store = Store(root / "store")
    frozen, config = load_params(store), store.config
    store.close()
    lora = LoraSettings(r=4, alpha=16, dropout=0.0, targets=ALL)
    fns = make_step_functions(config, lora, OptimizerSettings(lr=2e-2, total_steps=6), "float32", "none", 0)
    state = fns.init(init_lora_params(config, lora, 0))
    losses = []
    for i in range(6):
        state, metrics = fns.train_step(state, frozen, _batch(seed=i % 2))
        losses.append(float(metrics.loss))
    save_adapter(root / "run" / "adapter", jax.device_get(state.lora), lora, config, "base")
    return root, fns, frozen, losses


def test_training_loss_reads_the_tied_head(converted, trained, monkeypatch):
    """The chunked loss (loss.py) of the first step, taken before any update, is transformers' loss
    on the tied model; with a random lm_head in the embedding's place it is not."""
    _, hf, _, _, _ = converted
    root, fns, frozen, losses = trained
    reference = _hf_loss(hf, _batch(seed=0))
    assert abs(losses[0] - reference) < 1e-4 * max(1.0, reference)
    assert losses[-1] < losses[0] - 0.5 and all(np.isfinite(losses))
    head = jnp.asarray(np.random.default_rng(0).normal(0, 128 ** -0.5, (128, VOCAB)), jnp.float32)
    monkeypatch.setattr(step_module, "head_weight", lambda params, config: (head, False))
    config = Store(root / "store").config
    lora = LoraSettings(r=4, alpha=16, dropout=0.0, targets=ALL)
    bug = make_step_functions(config, lora, OptimizerSettings(lr=2e-2, total_steps=6), "float32", "none", 0)
    _, metrics = bug.train_step(bug.init(init_lora_params(config, lora, 0)), frozen, _batch(seed=0))
    assert abs(float(metrics.loss) - reference) > 100 * 1e-4 * max(1.0, reference)


def test_merged_and_exported_tied_model_matches_transformers(converted, trained):
    root, _, _, tokens, _ = converted
    ours = load_model(root / "store", adapter=root / "run").logits(tokens)
    assert max_diff(ours, load_model(root / "store").logits(tokens)) > 0.1  # the adapter matters
    merged = merge(root / "store", root / "run", root / "merged", progress=False).out_dir
    assert "lm_head" not in Store(merged).weight_map and Store(merged).config.tie_word_embeddings
    assert max_diff(load_model(merged).logits(tokens), ours) < 1e-5 * max(1.0, float(np.abs(ours).max()))
    result = export(root / "store", root / "export", adapter=root / "run", dtype="fp32")
    out = result.out_dir
    assert result.manifest["facts"]["max_abs_diff"] < TOL  # the export's own self-check
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert max_diff(hf_logits(loaded, tokens), ours) < TOL


def test_tied_presets_have_no_head_to_shard_or_plan():
    """The 1B's frozen weights on a model=4 mesh: no lm_head anywhere, and the plan counts exactly the
    tensors there are (the head would add 128256 x 2048 bf16 entries, a quarter per device)."""
    config, mesh = PRESETS["llama3.2-1B"], MeshShape(data=1, model=4)
    shards = frozen_shards(config, mesh)
    assert "lm_head/w" not in shards and shards["embed/embeddings"] == (128256 // 4, 2048)
    plan = plan_memory(config, seq_len=512, batch_size=1, mesh=mesh, lora=LoraSettings(r=8))
    untied = plan_memory(config.replace(tie_word_embeddings=False), seq_len=512, batch_size=1, mesh=mesh,
                         lora=LoraSettings(r=8))
    assert untied.frozen_bytes_per_device - plan.frozen_bytes_per_device == 128256 * 2048 * 2 // 4
    assert [k.store for k, _ in TABLE.tensors(config)][-1] == "final_norm"
    assert [k.store for k, _ in TABLE.tensors(PRESETS["7B"])][-1] == "lm_head"


def test_the_name_table_refuses_a_tied_row_that_is_not_the_embedding_transposed():
    TABLE.check()
    wrong = NameTable(dataclasses.replace(k, tied_head=True) if k.store == "final_norm" else k for k in TABLE.kinds)
    with pytest.raises(JoraError, match="more than one row is the tied head.*final_norm is not the transpose"):
        wrong.check()


@pytest.mark.parametrize("changes,fragment", [
    ({"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"]}, "model_type 'llama4'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "'mistral'"),
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, "mixture of experts"),
    ({"rms_norm_eps": "tiny"}, "'rms_norm_eps' must be a number"),
    ({"rope_parameters": None, "rope_theta": None}, "'rope_theta' must be a number"),
])
def test_convert_refuses_other_models_and_bad_numbers_in_one_line(converted, tmp_path, changes, fragment):
    src = tmp_path / "hf"
    shutil.copytree(converted[0] / "hf", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))
    assert_clean_failure(run_cli("convert", src, tmp_path / "store"), str(src / "config.json"), fragment)
    assert not (tmp_path / "store").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_convert_refuses_a_word_for_a_number_in_params_json(tmp_path, tokenizer_model):
    src, _ = _meta_tied(tmp_path, tokenizer_model, 1)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "norm_eps": "abc"}))
    assert_clean_failure(run_cli("convert", src, tmp_path / "store"), str(src / "params.json"),
                         "'norm_eps' must be a number ('abc')")
    assert not (tmp_path / "store").exists()
