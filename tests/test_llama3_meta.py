"""Meta's Llama 3 checkpoints: the embedding is split over the shards on its vocabulary rows.

Llama 2's ParallelEmbedding leaves each shard [V, D/n]; Llama 3's VocabParallelEmbedding leaves
[V/n, D]. The reader tells them apart by those shapes. Oracles: the port of Meta's model.py in
tests/oracles on the unsharded weights, and the oracle's own merge of the raw shards.

Tolerance 1e-4 max abs on fp32 logits of O(1..10), as in test_convert_parity.py: summation order
differences stay far inside it, while an embedding assembled from the wrong rows moves logits by O(1)
(test_embedding_rows_in_the_wrong_place_are_caught shows that it does).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from jora_model import load_model
from jora_model.errors import JoraError
from jora_model.formats.meta_checkpoint import MetaCheckpoint, meta_family
from jora_model.formats.names import LLAMA2, LLAMA3, TABLE, NameTable, TensorKind
from stages.convert import ConvertSettings, convert
from tests.conftest import VOCAB
from tests.oracles.checkpoints import (hf_to_meta_state_dict, meta_params, meta_split_dim, merge_meta_shards,
                                       random_hf_llama_from_meta, read_meta_shards, write_meta_checkpoint)
from tests.oracles.logits import max_diff
from tests.oracles.meta_llama import meta_logits

TOL = 1e-4
FP32 = ConvertSettings(dtype="fp32")
THETA = 500000.0
# GQA (8 query heads over 4 KV heads, both split by 4 shards), Llama 3's FFN multiplier and rope_theta.
PARAMS = meta_params(64, 2, 8, 4, 32, ffn_dim_multiplier=1.3, rope_theta=THETA)


def _meta_state(seed: int) -> dict[str, torch.Tensor]:
    hf = random_hf_llama_from_meta(PARAMS, VOCAB, seed=seed)
    return hf_to_meta_state_dict(hf.state_dict(), PARAMS["n_heads"], PARAMS["n_kv_heads"], rope_theta=THETA)


def _tokens(seq: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(2, seq))


def _oracle(state: dict[str, torch.Tensor], tokens: np.ndarray) -> np.ndarray:
    params = {**PARAMS, "vocab_size": VOCAB}
    return meta_logits(state, params, torch.as_tensor(tokens)).numpy()


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_llama3_checkpoint_matches_meta(shards, tmp_path, tokenizer_model):
    state = _meta_state(seed=shards)
    src = write_meta_checkpoint(tmp_path / "meta", state, PARAMS, shards, tokenizer_model, llama3=True)
    assert json.loads((src / "params.json").read_text())["vocab_size"] == VOCAB
    raw = read_meta_shards(src)
    assert all(tuple(s["tok_embeddings.weight"].shape) == (VOCAB // shards, 64) for s in raw)
    # the oracle's merge of the raw shards gives back the unsharded weights
    merged = merge_meta_shards(raw, llama3=True)
    assert all(torch.equal(merged[name], state[name]) for name in state)

    convert(src, tmp_path / "store", FP32, progress=False)
    model = load_model(tmp_path / "store")
    assert (model.config.vocab_size, model.config.n_kv_heads, model.config.rope_theta) == (VOCAB, 4, THETA)
    tokens = _tokens()
    ours = model.logits(tokens)
    assert ours.dtype == np.float32 and ours.shape == (2, 256, VOCAB)
    reference = _oracle(state, tokens)
    assert np.abs(reference).max() > 1.0  # logits large enough for the tolerance to mean something
    assert max_diff(ours, reference) < TOL


def test_the_family_comes_from_the_shard_shapes(tmp_path, tokenizer_model):
    """Not from a flag or params.json: Llama 3's shards and Llama 2's read as what they are."""
    state = _meta_state(seed=5)
    for llama3, shards, family in ((True, 2, LLAMA3), (True, 4, LLAMA3), (False, 2, LLAMA2), (False, 4, LLAMA2),
                                   (True, 1, LLAMA2), (False, 1, LLAMA2)):
        src = write_meta_checkpoint(tmp_path / f"{llama3}-{shards}", state, PARAMS, shards, None, llama3=llama3)
        checkpoint = MetaCheckpoint(src)
        assert (checkpoint.family, checkpoint.config.vocab_size) == (family, VOCAB), (llama3, shards)
        embed = next(array for name, array, _ in checkpoint.tensors() if name == "embed")
        np.testing.assert_array_equal(embed, state["tok_embeddings.weight"].numpy())


def test_llama2_split_embedding_with_llama3_params_still_converts(tmp_path, tokenizer_model):
    """A params.json that writes out vocab_size and rope_theta 500000 does not make the reader assume
    Llama 3's split: shards cut as Llama 2's are merged as Llama 2's."""
    state = _meta_state(seed=6)
    src = write_meta_checkpoint(tmp_path / "meta", state, PARAMS, 2, tokenizer_model, llama3=False)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "vocab_size": VOCAB}))
    convert(src, tmp_path / "store", FP32, progress=False)
    tokens = _tokens(seq=32)
    assert max_diff(load_model(tmp_path / "store").logits(tokens), _oracle(state, tokens)) < TOL


def test_meta_family_of_each_shape():
    dim, vocab = 4096, 128256
    assert meta_family((vocab // 8, dim), 8, dim, None) == (LLAMA3, vocab)
    assert meta_family((32000, dim // 8), 8, dim, None) == (LLAMA2, 32000)
    assert meta_family((32000, dim), 1, dim, None) == (LLAMA2, 32000)
    for shape, shards in (((vocab // 8, dim // 2), 8), ((32000, dim // 8), 1), ((32000, 2 * dim), 2)):
        with pytest.raises(JoraError, match=r"^consolidated\.00\.pth: tok_embeddings\.weight is") as caught:
            meta_family(shape, shards, dim, "consolidated.00.pth")
        assert "\n" not in str(caught.value)


def test_the_table_splits_as_the_oracle_writer():
    for kind, layer in TABLE.order(2):
        name = kind.meta_name(layer)
        assert kind.meta_split_of(LLAMA2) == meta_split_dim(name), name
        assert kind.meta_split_of(LLAMA3) == meta_split_dim(name, llama3=True), name
    with pytest.raises(JoraError, match="unknown Meta checkpoint family"):
        TABLE.kinds[0].meta_split_of("Llama 4")
    broken = NameTable([dataclasses.replace(TABLE.kinds[0], meta_split_llama3=2), *TABLE.kinds[1:]])
    with pytest.raises(JoraError, match="Llama 3's Meta split dim 2 of a 2-dimensional tensor"):
        broken.check()


def test_merging_llama3_embedding_as_llama2_is_refused(tmp_path, tokenizer_model, monkeypatch):
    """A reader that concatenates Llama 3's embedding shards along Llama 2's dim builds a
    [V/n, n*D] table: the store's shape check refuses it."""
    state = _meta_state(seed=7)
    src = write_meta_checkpoint(tmp_path / "meta", state, PARAMS, 2, tokenizer_model, llama3=True)
    monkeypatch.setattr(TensorKind, "meta_split_of", lambda self, family: self.meta_split)
    with pytest.raises(JoraError, match=r"embed has shape \(160, 128\)"):
        convert(src, tmp_path / "store", FP32, progress=False)


def test_embedding_rows_in_the_wrong_place_are_caught(tmp_path, tokenizer_model, monkeypatch):
    """Vocabulary rows merged into the right shape but the wrong order (shards reversed along dim 0)
    move the logits far past the tolerance: the parity test above sees a misassembled embedding."""
    state = _meta_state(seed=8)
    src = write_meta_checkpoint(tmp_path / "meta", state, PARAMS, 2, tokenizer_model, llama3=True)
    good = MetaCheckpoint._merge

    def reversed_embedding(self, states, name, kind):
        return good(self, states[::-1] if name == "tok_embeddings.weight" else states, name, kind)

    monkeypatch.setattr(MetaCheckpoint, "_merge", reversed_embedding)
    convert(src, tmp_path / "store", FP32, progress=False)
    monkeypatch.undo()
    tokens = _tokens(seq=32)
    assert max_diff(load_model(tmp_path / "store").logits(tokens), _oracle(state, tokens)) > 0.5


def test_shapes_that_fit_neither_family_are_one_line(tmp_path, tokenizer_model):
    state = _meta_state(seed=9)
    src = write_meta_checkpoint(tmp_path / "meta", state, PARAMS, 2, tokenizer_model, llama3=True)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "dim": 96}))
    with pytest.raises(JoraError, match="consolidated.00.pth: tok_embeddings.weight is") as caught:
        convert(src, tmp_path / "store", FP32, progress=False)
    assert "Llama 3's [V/2, 96]" in str(caught.value) and "\n" not in str(caught.value)


def test_vocab_size_that_disagrees_with_the_shards(tmp_path, tokenizer_model):
    state = _meta_state(seed=10)
    src = write_meta_checkpoint(tmp_path / "meta", state, PARAMS, 4, tokenizer_model, llama3=True)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "vocab_size": 128256}))
    with pytest.raises(JoraError, match=r"params\.json: vocab_size 128256 disagrees with the weights") as caught:
        convert(src, tmp_path / "store", FP32, progress=False)
    assert "320 rows in Llama 3's layout" in str(caught.value)
    assert not (tmp_path / "store").exists()
