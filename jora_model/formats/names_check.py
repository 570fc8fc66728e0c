"""Consistency checks of a name table (names.py): a row that contradicts the others, or a name two
rows share, would convert, export or shard some tensor as another one without any error."""

from __future__ import annotations

from jora_model.errors import JoraError
from jora_model.formats.names import LAYER_AXIS, META_FAMILIES, RANK_AXIS, TIED_TO, NameTable, TensorKind
from jora_model.model.config import LlamaConfig

# Every size differs from the others where Llama allows it, so a row with the wrong config field shows.
_SAMPLE = LlamaConfig(vocab_size=50, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40)


def _axis_sizes(c: LlamaConfig) -> dict[str, set[int]]:
    """The size each logical axis of a base tensor has (the sample's query and KV heads differ, so a
    k/v row marked `heads` or a q/o row marked `kv_heads` shows)."""
    return {"embed": {c.dim}, "vocab": {c.vocab_size}, "mlp": {c.ffn_dim},
            "heads": {c.n_heads * c.head_dim}, "kv_heads": {c.n_kv_heads * c.head_dim}}


def check_table(table: NameTable) -> None:
    problems = _layout_problems(table) + _name_problems(table)
    for kind in table.kinds:
        problems += [f"{kind.store}: {p}" for p in _row_problems(kind)]
    if problems:
        raise JoraError("the tensor name table contradicts itself: " + "; ".join(problems))


def _layout_problems(table: NameTable) -> list[str]:
    problems = []
    rows = [i for i, kind in enumerate(table.kinds) if kind.per_layer]
    if rows and rows != list(range(rows[0], rows[-1] + 1)):
        problems.append("the per-layer rows are not one block (checkpoint order needs them together)")
    tied = [kind for kind in table.kinds if kind.tied_head]
    embed = [kind for kind in table.kinds if kind.store == TIED_TO]
    if len(tied) > 1:
        problems.append("more than one row is the tied head")
    for kind in tied:
        if kind.per_layer or not embed or kind.shape(_SAMPLE) != embed[0].shape(_SAMPLE)[::-1]:
            problems.append(f"tied head {kind.store} is not the transpose of a global {TIED_TO!r} row")
    for what, key in (("module", lambda k: k.module), ("Haiku path", lambda k: k.path)):
        seen = [key(kind) for kind in table.kinds]
        problems += [f"{what} {name!r} appears twice" for name in sorted({n for n in seen if seen.count(n) > 1})]
    return problems


def _name_problems(table: NameTable) -> list[str]:
    """Every name of every format maps back to the tensor it names, and to no other."""
    problems = []
    for kind, layer in table.order(_SAMPLE.n_layers):
        for what, name, lookup in (("store", kind.store_name(layer), table.by_store),
                                   ("HF", kind.hf_name(layer), table.by_hf),
                                   ("Meta", kind.meta_name(layer), table.by_meta)):
            try:
                found = lookup(name)
            except JoraError:
                found = None
            if found is None or found[0] is not kind or found[1] != layer:
                problems.append(f"{what} name {name!r} does not map back to {kind.store_name(layer)}")
    return problems


def _row_problems(kind: TensorKind) -> list[str]:
    shape, problems = kind.shape(_SAMPLE), []
    if len(kind.axes) != len(shape):
        problems.append(f"{len(kind.axes)} logical axes for a {len(shape)}-dimensional tensor")
    sizes = _axis_sizes(_SAMPLE)
    for axis, n in zip(kind.axes, shape):
        if axis in (LAYER_AXIS, RANK_AXIS) or axis not in sizes:
            problems.append(f"axis {axis!r} is not a base tensor's axis")
        elif n not in sizes[axis]:
            problems.append(f"axis {axis!r} has size {n}, which that axis never has")
    if kind.transposed and len(shape) != 2:
        problems.append("only a matrix can be transposed")
    for family in META_FAMILIES:
        split = kind.meta_split_of(family)
        if split is not None and not (isinstance(split, int) and 0 <= split < len(shape)):
            problems.append(f"{family}'s Meta split dim {split!r} of a {len(shape)}-dimensional tensor")
    if kind.rotary_heads is not None:
        heads = getattr(_SAMPLE, kind.rotary_heads, None)
        if not kind.transposed or not isinstance(heads, int) or shape[-1] != heads * _SAMPLE.head_dim:
            problems.append(f"rotary rows are not {kind.rotary_heads} heads of the output features")
    if kind.lora:
        if not (kind.per_layer and kind.param == "w" and kind.transposed):
            problems.append("a LoRA target must be a per-layer linear weight")
        elif kind.lora_target != kind.hf.removesuffix(".weight").rsplit(".", 1)[-1]:
            problems.append(f"LoRA target {kind.lora_target!r} is not the HF module PEFT would wrap")
    return problems
