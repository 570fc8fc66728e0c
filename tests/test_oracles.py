"""The test oracles agree with each other, independently of jora.

transformers' LlamaForCausalLM (rotate_half rotary) and our port of Meta's model.py
(interleaved complex rotary) must produce the same logits once hf_to_meta_state_dict undoes
the rotary permutation; the Meta shard writer must round-trip; the tokenizer must follow
Llama's conventions.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.oracles.checkpoints import (
    hf_config_kwargs_from_meta,
    hf_to_meta_state_dict,
    meta_params,
    merge_meta_shards,
    random_hf_llama,
    random_hf_llama_from_meta,
    read_meta_shards,
    rope_permute,
    rope_unpermute,
    train_tokenizer,
    write_hf_dir,
    write_meta_checkpoint,
)
from tests.oracles.meta_llama import meta_ffn_hidden_dim, meta_logits

VOCAB = 320
SEQ = 24

# dim 64, 2 layers, head_dim 16
CASES = {
    "mha": meta_params(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32),
    "gqa": meta_params(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),
    "ffn_mult": meta_params(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=1.3,
        rope_theta=500.0,
    ),
}


def _tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)


def _pair(name: str, seed: int = 0):
    params = CASES[name]
    model = random_hf_llama_from_meta(params, VOCAB, seed=seed)
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    theta = params.get("rope_theta", 10000.0)
    return params, model, n_heads, n_kv, theta


def test_ffn_hidden_dim_formula():
    assert meta_ffn_hidden_dim(CASES["mha"]) == 192  # int(2*256/3)=170 -> 192
    assert meta_ffn_hidden_dim(CASES["ffn_mult"]) == 224  # int(1.3*170)=221 -> 224
    # real Llama-2 sizes
    assert meta_ffn_hidden_dim({"dim": 4096, "multiple_of": 256}) == 11008
    assert meta_ffn_hidden_dim({"dim": 5120, "multiple_of": 256}) == 13824
    assert meta_ffn_hidden_dim(
        {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}
    ) == 28672


def test_rope_permutation_inverse():
    w = torch.randn(32, 8)
    assert torch.equal(rope_unpermute(rope_permute(w, 2), 2), w)
    # HF order within a head is Meta rows [0, 2, 4, ..., 1, 3, 5, ...]
    rows = torch.arange(16.0)[:, None]
    assert rope_permute(rows, 1)[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14,
                                                    1, 3, 5, 7, 9, 11, 13, 15]


@pytest.mark.parametrize("name", list(CASES))
def test_meta_port_matches_transformers(name):
    params, model, n_heads, n_kv, theta = _pair(name)
    cfg = model.config
    assert cfg.rope_parameters["rope_theta"] == theta
    assert cfg.num_key_value_heads == n_kv and cfg.intermediate_size == meta_ffn_hidden_dim(params)
    tokens = _tokens()
    with torch.no_grad():
        ref = model(input_ids=tokens).logits.float()
    assert ref.shape == (2, SEQ, VOCAB)

    sd = hf_to_meta_state_dict(model.state_dict(), n_heads, n_kv, rope_theta=theta)
    assert sd["rope.freqs"].shape == (8,)
    assert sd["layers.0.attention.wk.weight"].shape == (n_kv * 16, 64)
    got = meta_logits(sd, params, tokens)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err < 1e-4, err
    assert ref.std().item() > 0.5  # large-scale weights: logits are not tiny

    # Teeth: skipping the un-permutation must be caught ...
    bad = hf_to_meta_state_dict(
        model.state_dict(), n_heads, n_kv, rope_theta=theta, undo_rope_permutation=False
    )
    assert (meta_logits(bad, params, tokens) - ref).abs().max().item() > 0.1
    # ... the first position is not rotated, so it agrees there
    assert (meta_logits(bad, params, tokens)[:, 0] - ref[:, 0]).abs().max().item() < 1e-4
    if n_kv != n_heads:
        # ... and so must un-permuting wk per query head instead of per KV head.
        wrong = dict(sd)
        for i in range(params["n_layers"]):
            k = f"model.layers.{i}.self_attn.k_proj.weight"
            wrong[f"layers.{i}.attention.wk.weight"] = rope_unpermute(
                model.state_dict()[k], n_heads
            )
        assert (meta_logits(wrong, params, tokens) - ref).abs().max().item() > 0.1


def test_hf_config_kwargs_and_tied_model():
    from transformers import LlamaConfig

    params = CASES["ffn_mult"]
    cfg = LlamaConfig(**hf_config_kwargs_from_meta(params, VOCAB))
    model = random_hf_llama_from_meta(params, VOCAB)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "vocab_size"):
        assert getattr(cfg, k) == getattr(model.config, k), k
    assert cfg.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"] == 500.0

    # seeded: same seed same weights, other seed differs
    a = random_hf_llama(VOCAB, 64, 1, 4, 2, 96, seed=3).state_dict()
    b = random_hf_llama(VOCAB, 64, 1, 4, 2, 96, seed=3).state_dict()
    c = random_hf_llama(VOCAB, 64, 1, 4, 2, 96, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           c["model.layers.0.self_attn.q_proj.weight"])

    tied = random_hf_llama(VOCAB, 64, 2, 4, 4, 192, seed=1, tie=True)
    tokens = _tokens(1)
    with torch.no_grad():
        ref = tied(input_ids=tokens).logits
    sd = hf_to_meta_state_dict(tied.state_dict(), 4, 4)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    p = meta_params(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, multiple_of=32)
    assert (meta_logits(sd, p, tokens) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["mha", "gqa", "ffn_mult"])
@pytest.mark.parametrize("n_shards", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_shards_roundtrip(tmp_path, name, n_shards, dtype):
    params, model, n_heads, n_kv, theta = _pair(name)
    sd = {k: v.to(dtype) for k, v in
          hf_to_meta_state_dict(model.state_dict(), n_heads, n_kv, rope_theta=theta).items()}
    if n_kv % n_shards:
        with pytest.raises(ValueError):
            write_meta_checkpoint(tmp_path, sd, params, n_shards, None)
        return
    tok = train_tokenizer(tmp_path / "src" / "tokenizer.model")
    out = write_meta_checkpoint(tmp_path / "ckpt", sd, params, n_shards, tok)

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["params.json", "tokenizer.model"] + [f"consolidated.{r:02d}.pth" for r in range(n_shards)]
    )
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    pj = json.loads((out / "params.json").read_text())
    assert pj["vocab_size"] == -1
    assert ("n_kv_heads" in pj) == (n_kv != n_heads)
    assert pj.get("ffn_dim_multiplier") == params.get("ffn_dim_multiplier")
    assert set(pj) <= {"dim", "multiple_of", "ffn_dim_multiplier", "n_heads", "n_kv_heads",
                       "n_layers", "norm_eps", "rope_theta", "vocab_size"}

    shards = read_meta_shards(out)
    assert len(shards) == n_shards
    for s in shards:
        assert set(s) == set(sd)
        assert s["tok_embeddings.weight"].shape == (VOCAB, 64 // n_shards)
        assert s["layers.1.attention.wk.weight"].shape == (n_kv * 16 // n_shards, 64)
        assert s["layers.1.attention.wo.weight"].shape == (64, 64 // n_shards)
        assert s["layers.0.feed_forward.w2.weight"].shape[1] == meta_ffn_hidden_dim(params) // n_shards
        assert s["output.weight"].shape == (VOCAB // n_shards, 64)
        for k, v in s.items():
            assert v.dtype == dtype and v.is_contiguous()
            # each shard's storage holds only its own slice (clone), not the whole tensor
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
        assert torch.equal(s["norm.weight"], sd["norm.weight"])
        assert torch.equal(s["rope.freqs"], sd["rope.freqs"])

    merged = merge_meta_shards(shards)
    assert set(merged) == set(sd)
    for k in sd:
        assert torch.equal(merged[k], sd[k]), k
    # explicit, independent of META_SPLIT_DIM: concat along the documented dims
    assert torch.equal(torch.cat([s["tok_embeddings.weight"] for s in shards], 1),
                       sd["tok_embeddings.weight"])
    for key, d in [("attention.wq", 0), ("attention.wk", 0), ("attention.wv", 0),
                   ("attention.wo", 1), ("feed_forward.w1", 0), ("feed_forward.w2", 1),
                   ("feed_forward.w3", 0)]:
        k = f"layers.0.{key}.weight"
        assert torch.equal(torch.cat([s[k] for s in shards], d), sd[k]), k
    assert torch.equal(torch.cat([s["output.weight"] for s in shards], 0), sd["output.weight"])


def test_write_hf_dir(tmp_path):
    from transformers import LlamaForCausalLM

    params, model, *_ = _pair("gqa")
    tok = train_tokenizer(tmp_path / "tokenizer.model")
    out = write_hf_dir(model, tmp_path / "hf", tok, max_shard_size="100KB")
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "tokenizer.model" in files
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert not any(f.endswith((".bin", ".pth")) for f in files)
    back = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sd0, sd1 = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_tokenizer_conventions(tmp_path):
    import sentencepiece as spm

    p = train_tokenizer(tmp_path / "a" / "tokenizer.model")
    q = train_tokenizer(tmp_path / "b" / "tokenizer.model")
    assert p.read_bytes() == q.read_bytes()  # deterministic
    sp = spm.SentencePieceProcessor(model_file=str(p))
    assert sp.get_piece_size() == VOCAB
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    # literal markers are text, not control ids
    for text in ("</s>", "a <s> b </s> c"):
        ids = sp.encode(text)
        assert 1 not in ids and 2 not in ids
        assert sp.decode(ids) == text
    # identity normalisation, no whitespace squashing, digits split, byte fallback
    for text in ("Hello  world\tand 12345 é€ 😀", "  two leading spaces"):
        assert sp.decode(sp.encode(text)) == text
    digits = sp.encode("12345", out_type=str)
    assert all(len(t.replace("\u2581", "")) <= 1 for t in digits)
    assert sp.encode("é", out_type=str)[-2:] == ["<0xC3>", "<0xA9>"]
    assert train_tokenizer(tmp_path / "c.model", vocab_size=330).exists()
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "c.model")).get_piece_size() == 330
