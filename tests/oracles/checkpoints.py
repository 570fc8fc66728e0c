"""Fixture builders: tiny tokenizers, random HF Llama models, and Meta-format checkpoints.

Everything here is generated locally (no hub, no downloads) and is independent of jora, so
tests can check jora's converters against two separate references (transformers'
``LlamaForCausalLM`` and the Meta ``model.py`` port in ``meta_llama.py``).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .meta_llama import meta_ffn_hidden_dim

__all__ = [
    "train_tokenizer",
    "random_hf_llama",
    "random_hf_llama_from_meta",
    "hf_to_meta_state_dict",
    "rope_permute",
    "rope_unpermute",
    "write_meta_checkpoint",
    "read_meta_shards",
    "merge_meta_shards",
    "write_hf_dir",
    "meta_params",
    "hf_config_kwargs_from_meta",
    "META_SPLIT_DIM",
    "META_SPLIT_DIM_LLAMA3",
    "meta_split_dim",
]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_WORDS = (
    "the a an and or but of to in on at for with from by about into over under after before "
    "model token layer weight train learn data text word sentence small large fast slow good "
    "new old first last next time year day people world life hand part place case point "
    "question answer number system program work group problem fact is was are were be been "
    "have has had do does did say said make made go went see saw know knew take took think "
    "come came give gave find found tell told ask asked seem feel try leave call keep let "
    "begin began show heard play run move live believe bring happen write provide sit stand "
    "lose pay meet include continue set change lead understand watch follow stop create speak "
    "read spend grow open walk win offer remember love consider appear buy wait serve die send "
    "expect build stay fall cut reach kill remain llama alpaca jax lora adapter rank matrix it we"
).split()
_PUNCT = (".", ".", ".", ",", ",", "?", "!", ";", ":")


def _synthetic_sentences(n: int = 3000, seed: int = 1234) -> Iterator[str]:
    """English-ish lines with digits, capitals, punctuation, quotes, tabs and double spaces."""
    rng = random.Random(seed)
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), f'"{rng.choice(_WORDS)}"')
        if words[0] in ("the", "a", "it", "in", "we"):  # few capitals: the alphabet must fit
            words[0] = words[0].capitalize()
        sep = "  " if rng.random() < 0.05 else ("\t" if rng.random() < 0.03 else " ")
        yield sep.join(words) + rng.choice(_PUNCT)


def train_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """Train a deterministic SentencePiece BPE model with Llama's conventions, write it to ``path``.

    unk=0 ``<unk>``, bos=1 ``<s>``, eos=2 ``</s>``, no pad, byte fallback (256 ``<0xNN>`` pieces
    at ids 3..258), identity normalisation, no extra-whitespace removal, digits split, dummy
    prefix on.  ``vocab_size`` must leave room for the characters of the training text
    (roughly >= 320).
    """
    import sentencepiece as spm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_synthetic_sentences(),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        unk_surface=" \u2047 ",
        hard_vocab_limit=True,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        seed_sentencepiece_size=1000000,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.get_piece_size() != vocab_size:  # pragma: no cover - hard_vocab_limit should ensure it
        raise RuntimeError(f"trained vocab {sp.get_piece_size()} != requested {vocab_size}")
    return path


# ---------------------------------------------------------------------------------------------
# Random transformers model
# ---------------------------------------------------------------------------------------------

def random_hf_llama(
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    intermediate_size: int,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    seed: int = 0,
    tie: bool = False,
):
    """A float32, eval-mode ``transformers.LlamaForCausalLM`` with large-scale seeded weights.

    Linear weights ~ N(0, 1/fan_in), embedding ~ N(0, 1), RMSNorm weights ~ 1 + 0.2 N(0, 1), so
    layout mistakes (missing rotary permutation, wrong GQA grouping, ...) move logits a lot.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=norm_eps,
        # transformers 5: rope_theta lives in rope_parameters (a legacy rope_theta= still works).
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() de-duplicates a tied lm_head, and its order is fixed by the module
        # tree, so the draw is deterministic for a given seed and shape.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:  # pragma: no cover - Llama has no biases here
                raise AssertionError(f"unexpected parameter {name} {tuple(p.shape)}")
    return model.float().eval()


def random_hf_llama_from_meta(params: Mapping, vocab_size: int, seed: int = 0, tie: bool = False):
    """``random_hf_llama`` for a Meta ``params`` dict (see ``meta_params``)."""
    n_heads = int(params["n_heads"])
    return random_hf_llama(
        vocab_size=vocab_size,
        dim=int(params["dim"]),
        n_layers=int(params["n_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads),
        intermediate_size=meta_ffn_hidden_dim(params),
        rope_theta=float(params.get("rope_theta") or 10000.0),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        seed=seed,
        tie=tie,
    )


# ---------------------------------------------------------------------------------------------
# HF <-> Meta naming and rotary layout
# ---------------------------------------------------------------------------------------------

def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> HF (rotate_half) row order, per head, as transformers'
    ``convert_llama_weights_to_hf.permute`` does: head rows [0,2,4,...,1,3,5,...]."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``rope_permute``: HF rotate_half row order -> Meta interleaved order."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, inp).transpose(1, 2).reshape(out, inp)


_LAYER_MAP = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def hf_to_meta_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor],
    n_heads: int,
    n_kv_heads: int,
    rope_theta: float = 10000.0,
    undo_rope_permutation: bool = True,
) -> dict[str, torch.Tensor]:
    """What Meta's original (unsharded) checkpoint would hold for this HF Llama state dict.

    Renames keys, un-permutes ``wq`` per query head and ``wk`` per KV head, copies a tied
    ``lm_head`` into ``output.weight`` and adds ``rope.freqs`` ([head_dim // 2], same dtype).
    ``undo_rope_permutation=False`` exists only to show tests have teeth.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in hf_state_dict.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = v.clone()
        elif k == "model.norm.weight":
            out["norm.weight"] = v.clone()
        elif k == "lm_head.weight":
            out["output.weight"] = v.clone()
        elif k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            if rest not in _LAYER_MAP:
                raise KeyError(f"unexpected HF key {k}")
            mk = f"layers.{int(i)}.{_LAYER_MAP[rest]}"
            if undo_rope_permutation and rest == "self_attn.q_proj.weight":
                v = rope_unpermute(v, n_heads)
            elif undo_rope_permutation and rest == "self_attn.k_proj.weight":
                v = rope_unpermute(v, n_kv_heads)
            out[mk] = v.clone().contiguous()
        else:
            raise KeyError(f"unexpected HF key {k}")
    if "output.weight" not in out:  # tied embeddings: Meta's output is always its own tensor
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    emb = out["tok_embeddings.weight"]
    head_dim = emb.shape[1] // n_heads
    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    out["rope.freqs"] = freqs.to(emb.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Meta params / HF config helpers
# ---------------------------------------------------------------------------------------------

def meta_params(
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int | None,
    multiple_of: int,
    ffn_dim_multiplier: float | None = None,
    norm_eps: float = 1e-5,
    rope_theta: float | None = None,
) -> dict:
    """A Meta ``params.json`` dict, spelled the way Meta writes it (Llama-2: vocab_size -1,
    n_kv_heads only when != n_heads, ffn_dim_multiplier / rope_theta only when set)."""
    p: dict = {"dim": dim, "multiple_of": multiple_of}
    if ffn_dim_multiplier is not None:
        p["ffn_dim_multiplier"] = ffn_dim_multiplier
    p["n_heads"] = n_heads
    if n_kv_heads is not None and n_kv_heads != n_heads:
        p["n_kv_heads"] = n_kv_heads
    p["n_layers"] = n_layers
    p["norm_eps"] = norm_eps
    if rope_theta is not None:
        p["rope_theta"] = rope_theta
    p["vocab_size"] = -1
    return p


def hf_config_kwargs_from_meta(params: Mapping, vocab_size: int) -> dict:
    """``transformers.LlamaConfig`` keyword arguments equivalent to a Meta ``params`` dict."""
    n_heads = int(params["n_heads"])
    return {
        "vocab_size": vocab_size,
        "hidden_size": int(params["dim"]),
        "intermediate_size": meta_ffn_hidden_dim(params),
        "num_hidden_layers": int(params["n_layers"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or n_heads),
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(params.get("rope_theta") or 10000.0),
        },
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


# ---------------------------------------------------------------------------------------------
# Meta consolidated.XX.pth writer
# ---------------------------------------------------------------------------------------------

# Model-parallel split dimension per Meta key suffix (None: replicated in every shard).
META_SPLIT_DIM = {
    "tok_embeddings.weight": 1,  # ParallelEmbedding (Llama-2 splits the embedding dim)
    "attention.wq.weight": 0,  # ColumnParallelLinear
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,  # RowParallelLinear
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "rope.freqs": None,
}


# Llama 3 (Meta's llama-models, models/llama3/model.py): VocabParallelEmbedding splits the
# vocabulary rows; every other tensor is split as in Llama 2.
META_SPLIT_DIM_LLAMA3 = {**META_SPLIT_DIM, "tok_embeddings.weight": 0}


def meta_split_dim(key: str, llama3: bool = False) -> int | None:
    for suffix, d in (META_SPLIT_DIM_LLAMA3 if llama3 else META_SPLIT_DIM).items():
        if key == suffix or key.endswith("." + suffix):
            return d
    raise KeyError(f"unknown Meta key {key}")


def write_meta_checkpoint(
    out_dir: Path,
    meta_state_dict: Mapping[str, torch.Tensor],
    params: Mapping,
    n_shards: int,
    tokenizer_path: Path | None,
    llama3: bool = False,
) -> Path:
    """Write a Meta-style checkpoint dir: params.json, tokenizer.model, consolidated.NN.pth.

    Shards follow fairscale's model-parallel layout (see ``META_SPLIT_DIM``); like Meta, this
    needs n_heads and n_kv_heads divisible by ``n_shards`` (each rank holds whole heads).
    Tensors keep their dtype and are cloned so each shard stores only its slice.
    ``llama3=True`` writes Llama 3's layout: the embedding split on its vocabulary rows
    (``META_SPLIT_DIM_LLAMA3``) and params.json's vocab_size written out, as Meta's 3.x releases do.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_heads = int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads") or n_heads)
    if n_shards < 1 or n_heads % n_shards or n_kv % n_shards:
        raise ValueError(
            f"n_shards={n_shards} must divide n_heads={n_heads} and n_kv_heads={n_kv}"
        )

    pj: dict = {"dim": int(params["dim"]), "multiple_of": int(params["multiple_of"])}
    if params.get("ffn_dim_multiplier") is not None:
        pj["ffn_dim_multiplier"] = params["ffn_dim_multiplier"]
    pj["n_heads"] = n_heads
    if n_kv != n_heads:
        pj["n_kv_heads"] = n_kv
    pj["n_layers"] = int(params["n_layers"])
    pj["norm_eps"] = params.get("norm_eps", 1e-5)
    if params.get("rope_theta") is not None:
        pj["rope_theta"] = params["rope_theta"]
    pj["vocab_size"] = int(meta_state_dict["tok_embeddings.weight"].shape[0]) if llama3 else -1
    (out_dir / "params.json").write_text(json.dumps(pj))

    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for k, v in meta_state_dict.items():
        d = meta_split_dim(k, llama3)
        if d is None:
            for s in shards:
                s[k] = v.clone()
            continue
        if v.shape[d] % n_shards:
            raise ValueError(f"{k} dim {d} ({v.shape[d]}) not divisible by n_shards={n_shards}")
        for s, piece in zip(shards, torch.chunk(v, n_shards, dim=d)):
            s[k] = piece.clone().contiguous()
    for r, s in enumerate(shards):
        torch.save(s, out_dir / f"consolidated.{r:02d}.pth")
    return out_dir


def read_meta_shards(ckpt_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Load consolidated.*.pth safely (weights_only, mmap; never unpickles code)."""
    files = sorted(Path(ckpt_dir).glob("consolidated.*.pth"))
    return [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]


def merge_meta_shards(
    shards: list[Mapping[str, torch.Tensor]], llama3: bool = False
) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel shards back along ``META_SPLIT_DIM`` (``META_SPLIT_DIM_LLAMA3``
    with ``llama3=True``): the reference merge."""
    out: dict[str, torch.Tensor] = {}
    for k in shards[0]:
        d = meta_split_dim(k, llama3)
        out[k] = shards[0][k].clone() if d is None else torch.cat([s[k] for s in shards], dim=d)
    return out


# ---------------------------------------------------------------------------------------------
# HF directory writer
# ---------------------------------------------------------------------------------------------

def write_hf_dir(
    model, out_dir: Path, tokenizer_path: Path | None = None, max_shard_size: str | None = None
) -> Path:
    """``model.save_pretrained`` (safetensors) plus tokenizer.model when given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    return out_dir
