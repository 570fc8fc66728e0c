"""The one table of the base model's tensor names, in every format jora reads or writes.

One row per kind of base tensor; every reader, writer and sharding rule is derived from it:
    store    our parameter store: `embed`, `layers.3.attention.q_proj`; matrices [in, out]
    Haiku    the model's tree: module path and parameter (`layers/attention/q_proj`, `w`); per-layer
             weights stacked on a leading L axis (the decoder runs as one scanned layer)
    HF       transformers' LlamaForCausalLM: `model.layers.3.self_attn.q_proj.weight`; matrices [out, in]
    Meta     Meta's consolidated.NN.pth: `layers.3.attention.wq.weight`; matrices [out, in], each split
             over the model-parallel shards on `meta_split` (fairscale's Column/RowParallelLinear,
             ParallelEmbedding in Meta's model.py), q/k in the interleaved rotary convention;
             Llama 3 splits some tensors elsewhere (`meta_split_llama3`: its VocabParallelEmbedding)
    PEFT     LoRA keys on the HF module: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
    adapter  our adapter file: `layers.3.attention.q_proj.lora_a` [in, r] and `.lora_b` [r, out]
The embedding is [V, D] in every format: it is a lookup table, not a matrix applied as `x @ w`.
A tied output head (Llama 3.2 1B/3B, `tie_word_embeddings`) has no tensor in any format: the model
reads the embedding as its head, and `NameTable.of(config)` leaves the head's row out.
`axes` are the logical axes of one layer's tensor in the store's layout; parallel/sharding.py maps
them to mesh axes (and gives LoRA's factors the axes of the base weight dimension they touch). The
k/v projections' heads are `kv_heads`, not `heads`: a model axis wider than the KV heads splits the
query heads but replicates the KV heads.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from jora_model.errors import JoraError
from jora_model.model.config import LlamaConfig

Shape = tuple[int, ...]

STACK = "layers"  # the layer stack's Haiku module (llama.STACK_NAME) and the store's per-layer prefix
LAYER_AXIS = "layers"  # logical axis of the stacked L dimension
RANK_AXIS = "rank"  # logical axis of LoRA's rank dimension
LORA_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B"}  # Haiku / adapter leaf -> PEFT's name
_HF_LAYER = "model.layers"
_META_LAYER = "layers"
_PEFT_PREFIX = "base_model.model"  # PeftModel wraps the HF model as base_model.model
# Meta's checkpoint families: the same names, but some tensors split over the shards on another dim.
LLAMA2 = "Llama 2"
LLAMA3 = "Llama 3"
META_FAMILIES = (LLAMA2, LLAMA3)
AS_LLAMA2 = "as Llama 2"  # meta_split_llama3's default: Llama 3 splits the tensor as Llama 2 did


@dataclasses.dataclass(frozen=True)
class TensorKind:
    """One kind of base tensor. Per-layer kinds (module under `layers/`) give their store, HF and Meta
    names relative to the layer (`attention.q_proj`); the *_name methods add the layer prefix."""

    store: str
    module: str  # Haiku module path
    param: str  # Haiku parameter name
    hf: str
    meta: str
    meta_split: int | None  # dim of Meta's Llama 2 tensor that model-parallel shards split; None: replicated
    axes: tuple[str, ...]  # logical axes of one layer's tensor, store layout
    shape: Callable[[LlamaConfig], Shape]  # one layer's shape in the store's layout
    transposed: bool = False  # HF and Meta hold the store's [in, out] matrix as [out, in]
    rotary_heads: str | None = None  # Meta's q/k: rows permuted to rotate-half per this many heads
    lora: bool = False  # a LoRA target; its target name (and PEFT's) is the module's last part
    meta_split_llama3: int | None | str = AS_LLAMA2  # the split dim in Llama 3's shards
    tied_head: bool = False  # the output head: no tensor of its own when the config ties it to the embedding

    def present(self, config: LlamaConfig) -> bool:
        """Whether a model of `config` has this tensor (a tied head reads the embedding instead)."""
        return not (self.tied_head and config.tie_word_embeddings)

    def meta_split_of(self, family: str) -> int | None:
        """The dim that model-parallel shards of Meta's `family` (LLAMA2 or LLAMA3) split."""
        if family not in META_FAMILIES:
            raise JoraError(f"unknown Meta checkpoint family {family!r}")
        if family == LLAMA3 and self.meta_split_llama3 != AS_LLAMA2:
            return self.meta_split_llama3
        return self.meta_split

    @property
    def per_layer(self) -> bool:
        return self.module.startswith(STACK + "/")

    @property
    def path(self) -> str:
        """The sharding rules' and the Haiku tree's name: "module/param"."""
        return f"{self.module}/{self.param}"

    @property
    def stacked_axes(self) -> tuple[str, ...]:
        """Logical axes of the Haiku leaf (per-layer weights carry the L axis first)."""
        return (LAYER_AXIS, *self.axes) if self.per_layer else self.axes

    @property
    def lora_target(self) -> str | None:
        return self.module.rsplit("/", 1)[-1] if self.lora else None

    def _full(self, name: str, prefix: str, layer: int | None) -> str:
        if self.per_layer != (layer is not None):
            kind = "per layer" if self.per_layer else "global"
            raise JoraError(f"{self.store} is {kind}: layer {layer} does not name one of its tensors")
        return name if layer is None else f"{prefix}.{layer}.{name}"

    def store_name(self, layer: int | None = None) -> str:
        return self._full(self.store, STACK, layer)

    def hf_name(self, layer: int | None = None) -> str:
        return self._full(self.hf, _HF_LAYER, layer)

    def meta_name(self, layer: int | None = None) -> str:
        return self._full(self.meta, _META_LAYER, layer)

    def adapter_name(self, layer: int, leaf: str) -> str:
        """Our adapter file's name of LoRA leaf `lora_a` or `lora_b`."""
        return f"{self.store_name(layer)}.{leaf}"

    def peft_name(self, layer: int, leaf: str) -> str:
        """PEFT's name of LoRA leaf `lora_a` or `lora_b`: the HF module's, wrapped, lora_A / lora_B."""
        return f"{_PEFT_PREFIX}.{self.hf_name(layer).removesuffix('.weight')}.{LORA_LEAVES[leaf]}.weight"


Entry = tuple[TensorKind, int | None]  # a kind and its layer (None for global tensors)


class NameTable:
    """The rows, in checkpoint order (the per-layer rows form one block), and lookups by any name."""

    def __init__(self, kinds: Iterable[TensorKind]):
        self.kinds = tuple(kinds)

    def groups(self, n_layers: int) -> list[list[Entry]]:
        """Every tensor in checkpoint order, grouped: global tensors before the layers, each layer,
        global tensors after."""
        per_layer = [k for k in self.kinds if k.per_layer]
        first = self.kinds.index(per_layer[0]) if per_layer else len(self.kinds)
        groups = [[(k, None) for k in self.kinds[:first] if not k.per_layer]]
        groups += [[(k, layer) for k in per_layer] for layer in range(n_layers)]
        groups.append([(k, None) for k in self.kinds[first:] if not k.per_layer])
        return [group for group in groups if group]

    def order(self, n_layers: int) -> list[Entry]:
        return [entry for group in self.groups(n_layers) for entry in group]

    def of(self, config: LlamaConfig) -> "NameTable":
        """The rows of the tensors a model of `config` has, in the same order: every reader, writer
        and list of parameters iterates this, so a tied head is absent from all of them at once."""
        return NameTable(kind for kind in self.kinds if kind.present(config))

    def tensors(self, config: LlamaConfig) -> list[Entry]:
        """Every tensor of a model of `config`, in checkpoint order."""
        return self.of(config).order(config.n_layers)

    def by_module(self, module: str) -> TensorKind:
        """The weight of a Haiku module (LoRA trees are keyed by module path)."""
        for kind in self.kinds:
            if kind.module == module:
                return kind
        raise JoraError(f"no base tensor belongs to module {module!r}")

    def by_store(self, name: str) -> Entry:
        return self._lookup(name, "store", STACK, "store")

    def by_hf(self, name: str) -> Entry:
        return self._lookup(name, "hf", _HF_LAYER, "Hugging Face")

    def by_meta(self, name: str) -> Entry:
        return self._lookup(name, "meta", _META_LAYER, "Meta")

    def _lookup(self, name: str, field: str, prefix: str, what: str) -> Entry:
        for kind in self.kinds:
            if not kind.per_layer and getattr(kind, field) == name:
                return kind, None
        layer, _, rest = name.removeprefix(prefix + ".").partition(".")
        if name.startswith(prefix + ".") and layer.isdigit() and layer == str(int(layer)):
            for kind in self.kinds:
                if kind.per_layer and getattr(kind, field) == rest:
                    return kind, int(layer)
        raise JoraError(f"{name!r} is not a {what} tensor name of the Llama layout")

    def check(self) -> None:
        """Raise JoraError on a table that contradicts itself (see names_check.py)."""
        from jora_model.formats.names_check import check_table

        check_table(self)


TABLE = NameTable((
    # Llama 2's ParallelEmbedding splits the model dim, Llama 3's VocabParallelEmbedding the vocabulary.
    TensorKind("embed", "embed", "embeddings", "model.embed_tokens.weight", "tok_embeddings.weight", 1,
               ("vocab", "embed"), lambda c: (c.vocab_size, c.dim), meta_split_llama3=0),
    TensorKind("attention_norm", "layers/attention_norm", "scale", "input_layernorm.weight",
               "attention_norm.weight", None, ("embed",), lambda c: (c.dim,)),
    TensorKind("attention.q_proj", "layers/attention/q_proj", "w", "self_attn.q_proj.weight",
               "attention.wq.weight", 0, ("embed", "heads"), lambda c: (c.dim, c.n_heads * c.head_dim),
               transposed=True, rotary_heads="n_heads", lora=True),
    TensorKind("attention.k_proj", "layers/attention/k_proj", "w", "self_attn.k_proj.weight",
               "attention.wk.weight", 0, ("embed", "kv_heads"), lambda c: (c.dim, c.n_kv_heads * c.head_dim),
               transposed=True, rotary_heads="n_kv_heads", lora=True),
    TensorKind("attention.v_proj", "layers/attention/v_proj", "w", "self_attn.v_proj.weight",
               "attention.wv.weight", 0, ("embed", "kv_heads"), lambda c: (c.dim, c.n_kv_heads * c.head_dim),
               transposed=True, lora=True),
    TensorKind("attention.o_proj", "layers/attention/o_proj", "w", "self_attn.o_proj.weight",
               "attention.wo.weight", 1, ("heads", "embed"), lambda c: (c.n_heads * c.head_dim, c.dim),
               transposed=True, lora=True),
    TensorKind("ffn_norm", "layers/ffn_norm", "scale", "post_attention_layernorm.weight", "ffn_norm.weight",
               None, ("embed",), lambda c: (c.dim,)),
    TensorKind("mlp.gate_proj", "layers/mlp/gate_proj", "w", "mlp.gate_proj.weight", "feed_forward.w1.weight",
               0, ("embed", "mlp"), lambda c: (c.dim, c.ffn_dim), transposed=True, lora=True),
    TensorKind("mlp.up_proj", "layers/mlp/up_proj", "w", "mlp.up_proj.weight", "feed_forward.w3.weight",
               0, ("embed", "mlp"), lambda c: (c.dim, c.ffn_dim), transposed=True, lora=True),
    TensorKind("mlp.down_proj", "layers/mlp/down_proj", "w", "mlp.down_proj.weight", "feed_forward.w2.weight",
               1, ("mlp", "embed"), lambda c: (c.ffn_dim, c.dim), transposed=True, lora=True),
    TensorKind("final_norm", "final_norm", "scale", "model.norm.weight", "norm.weight", None, ("embed",),
               lambda c: (c.dim,)),
    TensorKind("lm_head", "lm_head", "w", "lm_head.weight", "output.weight", 0, ("embed", "vocab"),
               lambda c: (c.dim, c.vocab_size), transposed=True, tied_head=True),
))
TIED_TO = "embed"  # the store name of the tensor a tied head reads (transposed: logits = x @ embed.T)
