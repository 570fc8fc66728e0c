"""Sharding: parameter names -> logical axes (the name table, formats/names.py) -> mesh axes (here).

The mesh has two axes: `data` (batches are split over it) and `model` (the frozen base is
tensor-sharded over it: attention heads, MLP hidden units, vocabulary). LoRA's A and B follow their
base layer: the factor that touches a sharded dimension is sharded the same way, the rank is not.
A parameter no rule matches is an error, never a silent replica.

A model axis wider than the K key/value heads (Llama 3.1 405B's 8 on model=16) is split in two, as
Megatron, vLLM and Meta's MP16 checkpoints do: the mesh gets axes `kv_group` (K) and `kv_copy`
(model / K) in place of `model`. Query heads, MLP units and vocabulary split over both, as they would
over `model`; k_proj and v_proj (and LoRA's B on them) split over `kv_group` only, so each device holds
one KV head, copied on the model / K devices of its group, and it is the head that device's queries
read: query head h reads KV head h // (H / K), and device i of the model axis holds query heads
i H / model .. (i + 1) H / model - 1, all in group i // (model / K). A KV gradient is summed over its
group's devices. A mesh of `model` alone for such a model is refused (make_mesh builds the split one).
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


# logical axis -> mesh axis (None: replicated), on a (data, model) mesh; mesh_rules gives the rules of
# a (data, kv_group, kv_copy) one
LOGICAL_TO_MESH: dict[str, str | None] = {
    "vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model",
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


KV_GROUP, KV_COPY = "kv_group", "kv_copy"  # the two parts of a model axis wider than the KV heads


def kv_grouped(config: LlamaConfig, model: int) -> bool:
    """Whether a model axis of `model` devices is wider than the KV heads (so split in two)."""
    return config.n_kv_heads % model != 0


def mesh_axes(shape: MeshShape, config: LlamaConfig | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(sizes, names) of the mesh for `shape`: (data, model), or (data, kv_group, kv_copy) where the
    model axis is wider than `config`'s KV heads; devices in the same order either way."""
    if config is not None and kv_grouped(config, shape.model):
        k = config.n_kv_heads
        return (shape.data, k, shape.model // k), ("data", KV_GROUP, KV_COPY)
    return (shape.data, shape.model), ("data", "model")


def mesh_rules(mesh) -> dict[str, Any]:
    """LOGICAL_TO_MESH for `mesh` (a jax Mesh or AbstractMesh): on a split model axis, what `model`
    splits is split over both of its parts, and the KV heads over their groups alone."""
    if KV_GROUP not in mesh.axis_names:
        return LOGICAL_TO_MESH
    rules = {axis: (KV_GROUP, KV_COPY) if target == "model" else target for axis, target in LOGICAL_TO_MESH.items()}
    return {**rules, "kv_heads": KV_GROUP}


def model_size(mesh) -> int:
    """Devices on the model axis of `mesh`, split or not."""
    sizes = dict(mesh.shape)
    return sizes.get("model", 1) * sizes.get(KV_GROUP, 1) * sizes.get(KV_COPY, 1)


def check_divisible(config: LlamaConfig, mesh: MeshShape, batch_size: int | None = None) -> None:
    """Every sharded dimension must split evenly, in whole heads; KV heads fewer than the model axis
    must divide it, so that each device's query heads read one KV head (see the module docstring)."""
    m = mesh.model
    for what, n in (("query heads", config.n_heads), ("MLP hidden units", config.ffn_dim),
                    ("vocabulary entries", config.vocab_size)):
        if n % m:
            raise JoraError(f"mesh {mesh}: model={m} does not divide the model's {n} {what}")
    k = config.n_kv_heads
    if k % m and m % k:
        raise JoraError(f"mesh {mesh}: model={m} does not divide the model's {k} key/value heads, "
                        f"nor is it a multiple of them")
    if batch_size is not None and batch_size % mesh.data:
        raise JoraError(f"mesh {mesh}: batch size {batch_size} is not a multiple of data={mesh.data}")


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None, config: LlamaConfig | None = None):
    """The devices as a `shape` mesh; with the model's `config`, a model axis wider than its KV heads
    is split in two (mesh_axes), which the sharding of such a model needs."""
    import jax
    import numpy as np

    devices = list(devices if devices is not None else jax.devices())
    if shape.size != len(devices):
        raise JoraError(f"mesh {shape} needs {shape.size} devices, but {len(devices)} are available")
    sizes, names = mesh_axes(shape, config)
    return jax.sharding.Mesh(np.array(devices).reshape(sizes), names)


def partition_spec(axes: Sequence[str], rules: dict[str, Any] = LOGICAL_TO_MESH):
    from jax.sharding import PartitionSpec

    return PartitionSpec(*(rules[a] for a in axes))


def param_sharding(mesh, path: str, shape: Sequence[int], config: LlamaConfig):
    """Where parameter `path` of a model of `config` lives on `mesh` (a jax Mesh or AbstractMesh)."""
    from jax.sharding import NamedSharding

    axes = logical_axes(path)
    if len(axes) != len(shape):
        raise JoraError(f"sharding rule for {path!r} names {len(axes)} axes but the parameter has {len(shape)}")
    m = model_size(mesh)
    if kv_grouped(config, m) != (KV_GROUP in mesh.axis_names):
        raise JoraError(f"a mesh of axes {tuple(mesh.axis_names)} cannot hold a model of {config.n_kv_heads} "
                        f"key/value heads on model={m}: build it with make_mesh(shape, devices, config)")
    return NamedSharding(mesh, partition_spec(axes, mesh_rules(mesh)))


def state_shardings(mesh, abstract_state: Any, config: LlamaConfig):
    """Every leaf of a training state: a leaf under a parameter's path (the adapter, and the optimizer
    moments that mirror it) follows that parameter's rule; counters and scalars are replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())

    def for_leaf(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if len(keys) >= 2 and len(leaf.shape) > 0:
            return param_sharding(mesh, f"{keys[-2]}/{keys[-1]}", leaf.shape, config)
        return replicated

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


def batch_sharding(mesh):
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, partition_spec(BATCH_AXES))


def batch_sharding_2d(mesh):
    """[B, T] batches (evaluation)."""
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, partition_spec(("batch", "seq")))
