"""Single-process pure-torch port of Meta's Llama-2 ``llama/model.py`` forward pass.

This is a test oracle: it must stay independent of jora.  Each piece mirrors the part of
Meta's ``model.py`` (github.com/meta-llama/llama, Llama-2 version) named in its comment.
Differences from the original, none of which change the numbers:

* fairscale's ``ParallelEmbedding`` / ``ColumnParallelLinear`` / ``RowParallelLinear`` are
  plain ``F.embedding`` / ``F.linear`` on the full (unsharded) weights (model-parallel size 1);
* no KV cache: one full-sequence forward from position 0 (``start_pos == 0``), so the cache
  writes/reads in ``Attention.forward`` collapse to using this call's keys and values;
* all positions' logits are returned (Llama-2's ``Transformer.forward`` does that too);
* ``rope_theta`` (added to ``ModelArgs`` by Code Llama, 10000 in Llama-2) is honoured;
* Llama 3.1's ``use_scaled_rope`` is honoured with ``apply_scaling`` from Meta's llama-models
  (``models/llama3/model.py``), including its optional ``rope_scaling_factor`` / ``rope_high_freq_factor``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "meta_logits",
    "meta_ffn_hidden_dim",
    "rms_norm",
    "precompute_freqs_cis",
    "apply_scaling",
    "apply_rotary_emb",
    "repeat_kv",
]


# --- ModelArgs -------------------------------------------------------------------------------
# Meta: @dataclass ModelArgs(dim, n_layers, n_heads, n_kv_heads=None, vocab_size=-1,
#       multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, max_batch_size, max_seq_len)
def _args(params: Mapping) -> dict:
    n_heads = int(params["n_heads"])
    n_kv = params.get("n_kv_heads")
    return {
        "dim": int(params["dim"]),
        "n_layers": int(params["n_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": n_heads if n_kv is None else int(n_kv),
        "vocab_size": int(params.get("vocab_size", -1)),
        "multiple_of": int(params.get("multiple_of", 256)),
        "ffn_dim_multiplier": params.get("ffn_dim_multiplier"),
        "norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta") or 10000.0),
        "use_scaled_rope": bool(params.get("use_scaled_rope", False)),
        "rope_scaling_factor": float(params.get("rope_scaling_factor") or 8.0),
        "rope_high_freq_factor": float(params.get("rope_high_freq_factor") or 4.0),
    }


# --- FeedForward.__init__ hidden-dim formula -------------------------------------------------
# Meta: TransformerBlock passes hidden_dim=4 * args.dim; FeedForward then does
#   hidden_dim = int(2 * hidden_dim / 3)
#   if ffn_dim_multiplier is not None: hidden_dim = int(ffn_dim_multiplier * hidden_dim)
#   hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
def meta_ffn_hidden_dim(params: Mapping) -> int:
    hidden_dim = 4 * int(params["dim"])
    hidden_dim = int(2 * hidden_dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden_dim = int(params["ffn_dim_multiplier"] * hidden_dim)
    m = int(params.get("multiple_of", 256))
    return m * ((hidden_dim + m - 1) // m)


# --- RMSNorm ----------------------------------------------------------------------------------
# Meta: _norm(x) = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
#       forward(x) = self._norm(x.float()).type_as(x) * self.weight
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    output = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return output * weight


# --- apply_scaling (Llama 3.1+, llama-models models/llama3/model.py) -------------------------
# Meta: low_freq_factor = 1 and old_context_len = 8192 are fixed; wavelengths above 8192 are divided
#       by scale_factor, those below 8192 / high_freq_factor kept, the band between blended.
def apply_scaling(freqs: torch.Tensor, scale_factor: float, high_freq_factor: float) -> torch.Tensor:
    low_freq_factor = 1
    old_context_len = 8192  # original llama3 length

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return torch.where(
        (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
        (1 - smooth) * new_freqs / scale_factor + smooth * new_freqs,
        new_freqs,
    )


# --- precompute_freqs_cis ---------------------------------------------------------------------
# Meta: freqs = 1 / (theta ** (arange(0, dim, 2)[: dim // 2].float() / dim)); t = arange(end)
#       freqs_cis = polar(ones, outer(t, freqs))  -> complex64 [end, dim // 2]
def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False,
                         scale_factor: float = 8.0, high_freq_factor: float = 4.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    if use_scaled:
        freqs = apply_scaling(freqs, scale_factor, high_freq_factor)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


# --- reshape_for_broadcast --------------------------------------------------------------------
def _reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ndim = x.ndim
    assert freqs_cis.shape == (x.shape[1], x.shape[-1])
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


# --- apply_rotary_emb -------------------------------------------------------------------------
# Meta: views the last dim as complex numbers over *interleaved* pairs (2i, 2i+1), multiplies
# by freqs_cis, views back as real and flattens.  x: [bsz, seqlen, heads, head_dim].
def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = _reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


# --- repeat_kv --------------------------------------------------------------------------------
# Meta: each KV head is repeated n_rep times *consecutively* (query head h uses KV head h // n_rep).
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


# --- Attention.forward (start_pos = 0, no cache) ------------------------------------------------
def _attention(
    x: torch.Tensor,
    sd: Mapping[str, torch.Tensor],
    prefix: str,
    a: dict,
    freqs_cis: torch.Tensor,
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    bsz, seqlen, _ = x.shape
    head_dim = a["dim"] // a["n_heads"]
    n_rep = a["n_heads"] // a["n_kv_heads"]
    xq = F.linear(x, sd[prefix + "wq.weight"])
    xk = F.linear(x, sd[prefix + "wk.weight"])
    xv = F.linear(x, sd[prefix + "wv.weight"])

    xq = xq.view(bsz, seqlen, a["n_heads"], head_dim)
    xk = xk.view(bsz, seqlen, a["n_kv_heads"], head_dim)
    xv = xv.view(bsz, seqlen, a["n_kv_heads"], head_dim)

    xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)

    # Meta writes xk/xv into cache_k/cache_v[:bsz, 0:seqlen] and reads back [:bsz, :seqlen].
    keys = repeat_kv(xk, n_rep)
    values = repeat_kv(xv, n_rep)

    xq = xq.transpose(1, 2)  # (bs, n_heads, seqlen, head_dim)
    keys = keys.transpose(1, 2)
    values = values.transpose(1, 2)
    scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores + mask
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    output = torch.matmul(scores, values)  # (bs, n_heads, seqlen, head_dim)
    output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
    return F.linear(output, sd[prefix + "wo.weight"])


# --- FeedForward.forward ----------------------------------------------------------------------
# Meta: w2(silu(w1(x)) * w3(x))
def _feed_forward(x: torch.Tensor, sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    w1, w2, w3 = (sd[prefix + n + ".weight"] for n in ("w1", "w2", "w3"))
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


# --- Transformer.forward (start_pos = 0) --------------------------------------------------------
@torch.inference_mode()
def meta_logits(
    state_dict: Mapping[str, torch.Tensor],
    params: Mapping,
    tokens: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits [batch, seq, vocab] (float32) of Meta's Llama-2 forward from position 0.

    ``state_dict`` uses Meta key names (``rope.freqs`` is ignored, as in Meta's code). Weights
    are cast to ``dtype`` first (float32 by default; pass torch.bfloat16 to mimic Meta's bf16
    inference, where RMSNorm and softmax still run in float32 and cast back).
    """
    a = _args(params)
    sd = {k: v.to(dtype) for k, v in state_dict.items() if k != "rope.freqs"}
    head_dim = a["dim"] // a["n_heads"]
    assert a["n_heads"] % a["n_kv_heads"] == 0
    assert sd["tok_embeddings.weight"].shape[1] == a["dim"]
    assert sd["layers.0.feed_forward.w1.weight"].shape[0] == meta_ffn_hidden_dim(params), (
        "w1 rows do not match Meta's FFN hidden-dim formula for these params"
    )
    if a["vocab_size"] > 0:
        assert sd["output.weight"].shape[0] == a["vocab_size"]

    tokens = torch.as_tensor(tokens, dtype=torch.long)
    _bsz, seqlen = tokens.shape
    h = F.embedding(tokens, sd["tok_embeddings.weight"])  # ParallelEmbedding
    # Meta precomputes for max_seq_len * 2 and slices [start_pos : start_pos + seqlen].
    freqs_cis = precompute_freqs_cis(head_dim, seqlen, a["rope_theta"], a["use_scaled_rope"],
                                     a["rope_scaling_factor"], a["rope_high_freq_factor"])

    mask = None
    if seqlen > 1:
        mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
        mask = torch.triu(mask, diagonal=1).type_as(h)  # start_pos = 0: no cached prefix

    for i in range(a["n_layers"]):
        # TransformerBlock.forward
        p = f"layers.{i}."
        h = h + _attention(
            rms_norm(h, sd[p + "attention_norm.weight"], a["norm_eps"]),
            sd, p + "attention.", a, freqs_cis, mask,
        )
        h = h + _feed_forward(
            rms_norm(h, sd[p + "ffn_norm.weight"], a["norm_eps"]), sd, p + "feed_forward."
        )
    h = rms_norm(h, sd["norm.weight"], a["norm_eps"])
    return F.linear(h, sd["output.weight"]).float()  # ColumnParallelLinear output, untied
