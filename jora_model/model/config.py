"""Model settings: one frozen dataclass, Llama-2's presets, and readers for Meta's and HF's files.

Shape glossary used across `jora_model`:
    B batch, T sequence, D model dim, H query heads, K key/value heads, R = H // K queries per KV head,
    E head dim (D // H), F feed-forward hidden dim, V vocabulary, L decoder layers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jora_model.errors import JoraError


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int  # V: rows of the embedding and of the output head
    dim: int  # D: width of the residual stream
    n_layers: int  # L: decoder blocks
    n_heads: int  # H: query heads
    n_kv_heads: int  # K: key/value heads (K < H is grouped-query attention; 70B uses 8)
    ffn_dim: int  # F: SwiGLU hidden width (Meta derives it from multiple_of / ffn_dim_multiplier)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base frequency
    max_seq_len: int = 4096  # longest context the model was trained for (Llama-2: 4096)
    # Llama 3.1+'s "llama3" rotary scaling (see llama.rope_inv_freq); no factor means plain rotary, and then
    # the other three stay at their defaults (Meta's values) and are left out of to_dict.
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # the output head reads the embedding table (logits = x @ embed.T; Llama 3.2 1B and 3B): no head
    # tensor of its own anywhere. Left out of to_dict when False, as untied stores always were.
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                     "rope_original_max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise JoraError(f"model setting {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise JoraError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise JoraError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise JoraError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise JoraError("norm_eps and rope_theta must be positive")
        if not isinstance(self.tie_word_embeddings, bool):
            raise JoraError(f"model setting tie_word_embeddings must be true or false, "
                            f"got {self.tie_word_embeddings!r}")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling_factor is None:
            changed = [name for name in _ROPE_SCALING_FIELDS[1:] if getattr(self, name) != _ROPE_DEFAULTS[name]]
            if changed:
                raise JoraError(f"{changed[0]} is set but rope_scaling_factor is not "
                                "(plain rotary has no such setting)")
            return
        for name in _ROPE_SCALING_FIELDS[:3]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise JoraError(f"model setting {name} must be a positive number, got {value!r}")
            # floats, so that 8 and 8.0 give the same settings, hash and to_dict
            object.__setattr__(self, name, float(value))
        if self.rope_scaling_factor < 1:
            raise JoraError(f"rope_scaling_factor {self.rope_scaling_factor} must be at least 1")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise JoraError(f"rope_high_freq_factor {self.rope_high_freq_factor} must exceed "
                            f"rope_low_freq_factor {self.rope_low_freq_factor}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head: query head h reads KV head h // n_rep."""
        return self.n_heads // self.n_kv_heads

    def param_count(self) -> int:
        d, e, f = self.dim, self.head_dim, self.ffn_dim
        attention = d * self.n_heads * e * 2 + d * self.n_kv_heads * e * 2
        block = attention + 3 * d * f + 2 * d
        tables = 1 if self.tie_word_embeddings else 2  # the embedding, and the head unless tied to it
        return tables * self.vocab_size * d + self.n_layers * block + d

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.rope_scaling_factor is None:
            # plain rotary writes exactly what it wrote before scaling existed (store and adapter metadata)
            for name in _ROPE_SCALING_FIELDS:
                del values[name]
        if not self.tie_word_embeddings:
            del values["tie_word_embeddings"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise JoraError(f"unknown model settings: {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as exc:  # a missing field
            raise JoraError(f"incomplete model settings: {exc}") from None

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


_ROPE_SCALING_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                        "rope_original_max_len")
_ROPE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LlamaConfig) if f.name in _ROPE_SCALING_FIELDS}


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The hidden width Meta's FeedForward computes from params.json (model.py, FeedForward.__init__)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Llama-2's published shapes. Parameter counts: 6,738,415,616 / 13,015,864,320 / 68,976,648,192.
PRESETS: dict[str, LlamaConfig] = {
    "7B": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      ffn_dim=meta_ffn_dim(4096, 256, None)),
    "13B": LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                       ffn_dim=meta_ffn_dim(5120, 256, None)),
    "70B": LlamaConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim=meta_ffn_dim(8192, 4096, 1.3)),
    # Llama 3.1 (and 3.3's 70B): the 128k vocabulary, rope_theta 500000 and the llama3 scaled rotary.
    # Parameter counts 8,030,261,248 and 70,553,706,496.
    "llama3-8B": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             ffn_dim=meta_ffn_dim(4096, 1024, 1.3), rope_theta=500000.0,
                             max_seq_len=131072, rope_scaling_factor=8.0),
    "llama3-70B": LlamaConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              ffn_dim=meta_ffn_dim(8192, 4096, 1.3), rope_theta=500000.0,
                              max_seq_len=131072, rope_scaling_factor=8.0),
    # Llama 3.1's 405B: Meta ships it in 8 or 16 model-parallel shards. Parameter count 405,853,388,800.
    "llama3.1-405B": LlamaConfig(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                                 ffn_dim=meta_ffn_dim(16384, 4096, 1.2), rope_theta=500000.0,
                                 max_seq_len=131072, rope_scaling_factor=8.0),
    # Llama 3.2's small models: the head tied to the embedding, and rotary scaled by 32.
    # Parameter counts 1,235,814,400 and 3,212,749,824.
    "llama3.2-1B": LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                               ffn_dim=meta_ffn_dim(2048, 256, 1.5), rope_theta=500000.0,
                               max_seq_len=131072, rope_scaling_factor=32.0, tie_word_embeddings=True),
    "llama3.2-3B": LlamaConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                               ffn_dim=meta_ffn_dim(3072, 256, 1.0), rope_theta=500000.0,
                               max_seq_len=131072, rope_scaling_factor=32.0, tie_word_embeddings=True),
}


# Small shapes for benchmarks and tests (random weights only; no such checkpoints exist).
BENCH_SHAPES: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=32000, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=344),
    "small": LlamaConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376),
    "base110m": LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048),
    # `small` with Llama 3's 128k vocabulary: what the output head and the loss cost at that size
    "small128k": LlamaConfig(vocab_size=128256, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376),
}


def preset(name: str) -> LlamaConfig:
    """Llama-2's 7B/13B/70B, Llama 3.1's llama3-8B/llama3-70B/llama3.1-405B, Llama 3.2's
    llama3.2-1B/llama3.2-3B, or a benchmark shape (tiny, small, base110m, small128k); case-insensitive."""
    table = {**{k.lower(): v for k, v in PRESETS.items()}, **BENCH_SHAPES}
    try:
        return table[name.lower()]
    except KeyError:
        raise JoraError(f"unknown preset {name!r}; choose one of {', '.join(table)}") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; one clear line for a missing, unreadable or other file."""
    if not path.is_file():
        raise JoraError("file not found", path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JoraError(f"not valid JSON ({exc})", path) from None
    if not isinstance(value, dict):
        raise JoraError("expected a JSON object", path)
    return value


def _require(values: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in values:
        raise JoraError(f"missing field {key!r}", path)
    value = values[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JoraError(f"field {key!r} has the wrong type ({value!r})", path)
    return value


def read_meta_params(path: Path, vocab_size: int | None = None) -> LlamaConfig:
    """Read Meta's params.json. Llama-2 writes `vocab_size: -1`; pass the real size (from the
    tokenizer or output.weight) as `vocab_size` then."""
    path = Path(path)
    p = read_json_object(path)
    dim = _require(p, "dim", int, path)
    n_heads = _require(p, "n_heads", int, path)
    n_layers = _require(p, "n_layers", int, path)
    multiple_of = p.get("multiple_of", 256)
    multiplier = p.get("ffn_dim_multiplier")
    if not isinstance(multiple_of, int) or multiple_of <= 0:
        raise JoraError(f"field 'multiple_of' must be a positive integer ({multiple_of!r})", path)
    if multiplier is not None and not isinstance(multiplier, (int, float)):
        raise JoraError(f"field 'ffn_dim_multiplier' must be a number ({multiplier!r})", path)
    n_kv_heads = p.get("n_kv_heads") or n_heads
    file_vocab = p.get("vocab_size", -1)
    if isinstance(file_vocab, int) and file_vocab > 0:
        if vocab_size is not None and vocab_size != file_vocab:
            raise JoraError(f"vocab_size {file_vocab} disagrees with the weights ({vocab_size} rows)", path)
        vocab_size = file_vocab
    if vocab_size is None:
        raise JoraError("vocab_size is -1 and no tokenizer or output weight gives it", path)
    _refuse_other_architectures(p, path)
    try:
        return LlamaConfig(
            vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            ffn_dim=meta_ffn_dim(dim, multiple_of, multiplier),
            norm_eps=float(_number(p, "norm_eps", 1e-5, path)),
            rope_theta=float(_number(p, "rope_theta", 10000.0, path)),
            max_seq_len=_number(p, "max_seq_len", _meta_context(p), path, integer=True),
            **_meta_rope_scaling(p, path),
        )
    except JoraError as exc:
        raise JoraError(str(exc), path) from None


LLAMA3_VOCAB = 128256  # Llama 3's tiktoken vocabulary, which its params.json writes out


def _meta_context(p: dict[str, Any]) -> int:
    """The context Meta trained for, which params.json does not say (Meta's code takes it as an
    argument): Llama 3.1+ (scaled rotary) 131072, Llama 3 without scaling 8192, Llama 2 4096."""
    if p.get("use_scaled_rope"):
        return 131072
    return 8192 if p.get("vocab_size") == LLAMA3_VOCAB else 4096


def _number(values: dict[str, Any], key: str, default: Any, path: Path, integer: bool = False) -> Any:
    """values[key], or `default` when the key is absent; an explicit null, a string or a bool is an
    error (a number written wrongly must not silently become the default)."""
    value = values.get(key, default)
    kind = int if integer else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = "an integer" if integer else "a number"
        raise JoraError(f"field {key!r} must be {what} ({value!r})", path)
    return value


# Settings of models that look like Llama in config.json but compute something else.
_OTHER_ARCHITECTURE_KEYS = {
    "sliding_window": "sliding-window attention (Mistral)",
    "num_local_experts": "mixture of experts", "num_experts": "mixture of experts",
    "num_experts_per_tok": "mixture of experts", "n_routed_experts": "mixture of experts",
    "moe_args": "mixture of experts", "moe_intermediate_size": "mixture of experts",
}


def _refuse_other_architectures(values: dict[str, Any], path: Path) -> None:
    for key, what in _OTHER_ARCHITECTURE_KEYS.items():
        if values.get(key) not in (None, 0, False):
            raise JoraError(f"{key} {values[key]!r} means {what}, which Llama does not have; jora converts "
                            "Llama only", path)


def _meta_rope_scaling(p: dict[str, Any], path: Path) -> dict[str, Any]:
    """Meta's `use_scaled_rope` (llama-models' apply_scaling): factor 8 and high frequency factor 4
    unless params.json names them; the low frequency factor 1 and original context 8192 are fixed there."""
    if not p.get("use_scaled_rope"):
        return {}
    return {"rope_scaling_factor": _number(p, "rope_scaling_factor", 8.0, path),
            "rope_high_freq_factor": _number(p, "rope_high_freq_factor", 4.0, path),
            "rope_low_freq_factor": 1.0, "rope_original_max_len": 8192}


_HF_LLAMA3_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                   "high_freq_factor": "rope_high_freq_factor",
                   "original_max_position_embeddings": "rope_original_max_len"}


def _hf_rope(c: dict[str, Any], path: Path) -> tuple[float, dict[str, Any]]:
    """config.json's rope_theta and scaling: plain rotary or Llama 3.1's "llama3" type
    (transformers 5 writes `rope_parameters`, older versions `rope_scaling`)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise JoraError(f"rope settings must be a JSON object ({rope!r})", path)
    theta = _number(c, "rope_theta", rope.get("rope_theta", 10000.0), path)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), {}
    if rope_type != "llama3":
        raise JoraError(f"rope scaling {rope_type!r} is not supported (plain rotary and llama3 only)", path)
    missing = [key for key in _HF_LLAMA3_KEYS if key not in rope]
    if missing:
        raise JoraError(f"llama3 rope scaling lacks {missing[0]!r}", path)
    return float(theta), {ours: _number(rope, key, None, path) for key, ours in _HF_LLAMA3_KEYS.items()}


def read_hf_config(path: Path) -> tuple[LlamaConfig, bool]:
    """Read an HF Llama config.json; returns the settings and whether the output head is tied (the
    same as the settings' tie_word_embeddings)."""
    path = Path(path)
    c = read_json_object(path)
    arch = c.get("architectures") or []
    if c.get("model_type") != "llama" or not isinstance(arch, list) or any(a != "LlamaForCausalLM" for a in arch):
        what = f"model_type {c.get('model_type')!r}" if c.get("model_type") != "llama" else f"architectures {arch!r}"
        raise JoraError(f"not a Llama model ({what}); jora converts LlamaForCausalLM only", path)
    _refuse_other_architectures(c, path)
    if c.get("hidden_act", "silu") != "silu":
        raise JoraError(f"hidden_act {c['hidden_act']!r} is not Llama's silu", path)
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise JoraError("attention or MLP biases are not part of Llama and are not supported", path)
    tied = c.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise JoraError(f"field 'tie_word_embeddings' must be true or false ({tied!r})", path)
    theta, scaling = _hf_rope(c, path)
    dim = _require(c, "hidden_size", int, path)
    n_heads = _require(c, "num_attention_heads", int, path)
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise JoraError(f"head_dim {head_dim} != hidden_size / num_attention_heads is not supported", path)
    try:
        config = LlamaConfig(
            vocab_size=_require(c, "vocab_size", int, path), dim=dim,
            n_layers=_require(c, "num_hidden_layers", int, path), n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            ffn_dim=_require(c, "intermediate_size", int, path),
            norm_eps=float(_number(c, "rms_norm_eps", 1e-6, path)), rope_theta=float(theta),
            max_seq_len=_number(c, "max_position_embeddings", 4096, path, integer=True),
            tie_word_embeddings=tied, **scaling,
        )
    except JoraError as exc:
        raise JoraError(str(exc), path) from None
    return config, tied
