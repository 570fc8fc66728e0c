"""Sharding: parameter names -> logical axes (the name table, formats/names.py) -> mesh axes (here).

The mesh has two axes: `data` (batches are split over it) and `model` (the frozen base is
tensor-sharded over it: attention heads, MLP hidden units, vocabulary). LoRA's A and B follow their
base layer: the factor that touches a sharded dimension is sharded the same way, the rank is not.
A parameter no rule matches is an error, never a silent replica.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

from jora_model.errors import JoraError
from jora_model.formats.names import LORA_LEAVES, RANK_AXIS, TABLE
from jora_model.model.config import LlamaConfig


@functools.cache
def param_rules() -> dict[str, tuple[str, ...]]:
    """The logical axes of every parameter the model can have, by "module/param" path. A base weight's
    axes come from the name table; LoRA's A and B on a linear layer take the axis of the base weight
    dimension each shares with it (A the input, B the output), and the rank is replicated. A model
    whose head is tied has no lm_head/w leaf: its head is the embedding, whose vocabulary rows are
    sharded as lm_head's columns would be, so its logits are split over `model` the same way."""
    lora_a, lora_b = LORA_LEAVES
    rules: dict[str, tuple[str, ...]] = {}
    for kind in TABLE.kinds:
        axes = kind.stacked_axes
        rules[kind.path] = axes
        if kind.lora:
            *stack, fan_in, fan_out = axes
            rules[f"{kind.module}/{lora_a}"] = (*stack, fan_in, RANK_AXIS)
            rules[f"{kind.module}/{lora_b}"] = (*stack, RANK_AXIS, fan_out)
    return rules


# logical axis -> mesh axis (None: replicated)
LOGICAL_TO_MESH: dict[str, str | None] = {
    "vocab": "model", "heads": "model", "mlp": "model",
    "embed": None, "layers": None, "rank": None,
    "batch": "data", "seq": None, "accum": None,
}
BATCH_AXES = ("accum", "batch", "seq")  # [micro-batches, rows, tokens]


def logical_axes(path: str) -> tuple[str, ...]:
    try:
        return param_rules()[path]
    except KeyError:
        raise JoraError(f"no sharding rule for parameter {path!r}") from None


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    model: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        """'data=2,model=4' (either may be left out: it is then 1)."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in ("data", "model") or not value.isdigit() or int(value) < 1 or name in sizes:
                raise JoraError(f"bad mesh {text!r}: expected e.g. data=2,model=4")
            sizes[name] = int(value)
        return cls(**sizes)

    def __str__(self) -> str:
        return f"data={self.data},model={self.model}"

    @property
    def size(self) -> int:
        return self.data * self.model


def check_divisible(config: LlamaConfig, mesh: MeshShape, batch_size: int | None = None) -> None:
    """Every sharded dimension must split evenly, in whole heads."""
    m = mesh.model
    for what, n in (("query heads", config.n_heads), ("key/value heads", config.n_kv_heads),
                    ("MLP hidden units", config.ffn_dim), ("vocabulary entries", config.vocab_size)):
        if n % m:
            raise JoraError(f"mesh {mesh}: model={m} does not divide the model's {n} {what}")
    if batch_size is not None and batch_size % mesh.data:
        raise JoraError(f"mesh {mesh}: batch size {batch_size} is not a multiple of data={mesh.data}")


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None):
    import jax
    import numpy as np

    devices = list(devices if devices is not None else jax.devices())
    if shape.size != len(devices):
        raise JoraError(f"mesh {shape} needs {shape.size} devices, but {len(devices)} are available")
    return jax.sharding.Mesh(np.array(devices).reshape(shape.data, shape.model), ("data", "model"))


def partition_spec(axes: Sequence[str]):
    from jax.sharding import PartitionSpec

    return PartitionSpec(*(LOGICAL_TO_MESH[a] for a in axes))


def param_sharding(mesh, path: str, shape: Sequence[int]):
    from jax.sharding import NamedSharding

    axes = logical_axes(path)
    if len(axes) != len(shape):
        raise JoraError(f"sharding rule for {path!r} names {len(axes)} axes but the parameter has {len(shape)}")
    return NamedSharding(mesh, partition_spec(axes))


def state_shardings(mesh, abstract_state: Any):
    """Every leaf of a training state: a leaf under a parameter's path (the adapter, and the optimizer
    moments that mirror it) follows that parameter's rule; counters and scalars are replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())

    def for_leaf(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if len(keys) >= 2 and len(leaf.shape) > 0:
            return param_sharding(mesh, f"{keys[-2]}/{keys[-1]}", leaf.shape)
        return replicated

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


def batch_sharding(mesh):
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, partition_spec(BATCH_AXES))


def batch_sharding_2d(mesh):
    """[B, T] batches (evaluation)."""
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, partition_spec(("batch", "seq")))
