"""Will it fit? The bytes per device of one LoRA training step, from shapes alone.

Nothing is allocated: parameter shapes come from `layout.param_specs`, the training state's shapes from
`jax.eval_shape` of the real optimizer (train.make_step_functions' abstract_state), and each tensor's
per-device share from the sharding rules in sharding.py applied to a `jax.sharding.AbstractMesh` (so a
mesh of 64 devices can be planned on a laptop).

Persistent memory is exact: frozen weights, the fp32 LoRA master copy, AdamW's two fp32 moments, the
LoRA gradients (the accumulator and the micro-batch's own), the batch. The rest is an estimate of what
the compiled step keeps, term by term, in `StepMemoryModel`: its numbers were read off XLA's (CPU)
buffer assignment of the step as train.py and llama.py write it today (bf16 compute with bf16 backward
matmuls and a custom attention backward, fp32 LoRA path, cross-entropy over chunks of the sequence).
When the step changes, change the term that moved and rerun
`benchmarks/plan_vs_measured.py`, which checks the estimate against XLA's own account.

Shapes per device: b = batch rows / data, T tokens, D model dim (the residual stream is replicated over
`model`), and the sharded widths H_m = heads / model, K_m = KV heads / model (one where the model
axis is wider than K: each device holds the KV head its queries read, see sharding.py),
F_m = ffn / model, V_m = vocab / model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from jora_model.model.blocks import largest_divisor
from jora_model.model.config import LlamaConfig
from jora_model.backends import resolve_kernels
from jora_model.errors import JoraError
from jora_model.formats.layout import param_specs
from jora_model.model.lora import LoraSettings
from jora_model.model.remat import POLICIES, check_policy
from jora_model.parallel.sharding import MeshShape, check_divisible

_DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


@dataclasses.dataclass(frozen=True)
class StepMemoryModel:
    """What one micro-batch's forward and backward keep, in bytes per element of each shape.

    Without remat every layer keeps its forward intermediates (none of them [T,T]) until its backward.
    With remat (remat.py) each layer keeps what its policy names, as integer bits (kept.py): its input
    and attention's output and row statistics, and under "matmuls" also q, k, v, the residual stream
    after attention, gate and up; one layer at a time is rebuilt for its backward. Either way the peak
    comes inside one layer's backward or at the head (one chunk's logits), whichever is larger: both
    are never live at once. Read off XLA's buffer assignment of the step (CPU).
    """
    saved_input: int = 2  # [b,T,D] layer input kept per layer under remat (bf16 bits)
    saved_attention: int = 2  # [b,T,H_m E] attention output kept per layer under remat (bf16 bits), and
    saved_statistics: int = 4 + 4  # [b,H_m,T] its row max and row sum (fp32): the rebuilt layer skips
    # attention's forward
    saved_projections: int = 2  # per element of q, k, v [b,T,(H_m + 2 K_m) E], the residual stream after
    # attention [b,T,D], gate and up [b,T,2 F_m], kept per layer under remat "matmuls" (bf16 bits)
    hidden: int = 4 * 4 + 2 * 2  # [b,T,D] per layer: RMSNorm's fp32 upcasts and fp32 residual sums,
    # the two normalised inputs in bf16
    dropout_input: int = 4  # [b,T,in] per LoRA target: its dropped-out input (fp32), kept for dA
    lora_mid: int = 4  # [b,T,r] per LoRA target: x @ A (fp32)
    qkv: int = 2 + 4  # [b,T,width] of q, k and v: bf16 and the fp32 rotary result
    mlp: int = 16  # [b,T,F_m]: gate, up and silu(gate) * up in bf16 (what swiglu's and down_proj's
    # backward read) and about 10 bytes of the MLP backward's fp32 and bf16 gradients; fitted to XLA's
    # account of the step (benchmarks/plan_vs_measured.py)
    scores_backward: int = 4 + 4 + 2 + 2  # [b,H_m,Tq,T] live in one layer's attention backward, which
    # recomputes them for one block of Tq queries at a time (attention.attend keeps no [T,T] residual):
    # fp32 probabilities and their gradient, bf16 probabilities and score gradient
    model_parallel_reduce: int = 5 * 4  # [b,T,D] with model > 1: fp32 buffers of the all-reduces that sum
    # the sharded projections' partial results into the replicated residual stream (and its gradient);
    # five were live at the peak of one rebuilt layer's backward (small, model=8, T=4096)
    query_block: int | None = None  # Tq: the largest divisor of T not above this; None: the causal
    # block length the kernel set's attention uses
    logits: int = 4 + 2  # [b,c,V_m] per chunk of c tokens: fp32 logits and their bf16 gradient (the
    # gradient's transpose, which the head's backward matmul reads, is made after the logits are dead)
    logits_chunk: int | None = None  # the head runs over chunks of c tokens, c the largest divisor of
    # T with b c V at most this many logits; None: the kernel set's own (Kernels.loss_chunk)
    layer_weight_copy: int = 0  # bytes per entry of the stacked layer matrices that a copy of them
    # costs with remat: none, since the cpu set's step takes them as bit patterns already
    # (backends/cpu/bits.py) and has nothing to convert before the layer loop
    layer_weight_copy_no_remat: int = 2  # the same without remat: XLA's CPU compiler still makes one
    # (a constant per layer-matrix entry on top of the per-token terms, fitted to XLA's account)
    head_copies_with_accum: int = 4  # bytes per entry of the head the loss reads (lm_head, or the
    # embedding it is tied to) when grad_accum > 1: an fp32 copy hoisted out of the micro-batch loop


DEFAULT_STEP = StepMemoryModel()


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one training step on `mesh` (every figure per device)."""
    mesh: MeshShape  # data x model
    seq_len: int  # T: tokens per row
    batch_size: int  # rows per micro-batch, over the whole data axis
    grad_accum: int  # micro-batches per optimizer step (activations are per micro-batch)
    remat: str  # the remat policy activation_bytes_per_device assumes (remat.POLICIES)
    param_dtype: str  # dtype of the frozen weights
    frozen_bytes_per_device: int  # the frozen base's share (sharded by the rules, norms replicated)
    lora_bytes_per_device: int  # fp32 master copy of the adapter
    optimizer_bytes_per_device: int  # AdamW's fp32 moments and step counters
    gradient_bytes_per_device: int  # fp32 LoRA gradients: the accumulator and the micro-batch's own
    batch_bytes_per_device: int  # input ids, loss mask and segment ids of the step
    weight_copy_bytes_per_device: int  # the copy of the stacked layer weights XLA's CPU compiler makes
    activation_bytes_per_device: int  # estimated activations for the remat policy asked
    activation_bytes_by_remat: dict[str, int]  # the same for every policy
    activation_terms: dict[str, int]  # the named terms both figures are built from
    total_bytes_per_device: int  # everything above (activations for the remat policy asked)
    device_memory: int | None  # bytes each device has, when given
    fits: bool | None  # total <= device_memory; None without device_memory

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mesh"] = str(self.mesh)
        return out


def parse_bytes(text: str | int) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '1.5TB' or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if unit is None or unit not in _UNITS:
            raise JoraError(f"device memory {text!r} is not a size like 80GB, 80GiB or 512MB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise JoraError(f"device memory must be positive, got {text!r}")
    return value


def _abstract_mesh(mesh: MeshShape, config: LlamaConfig):
    from jax.sharding import AbstractMesh

    from jora_model.parallel.sharding import mesh_axes

    return AbstractMesh(*mesh_axes(mesh, config))


def _shard_bytes(sharding: Any, shape: tuple[int, ...], itemsize: int) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * itemsize


def frozen_shards(config: LlamaConfig, mesh: MeshShape) -> dict[str, tuple[int, ...]]:
    """Per-device shape of every frozen tensor ("module/param" -> shape), by the sharding rules."""
    from jora_model.parallel import sharding

    abstract = _abstract_mesh(mesh, config)
    return {spec.path: tuple(sharding.param_sharding(abstract, spec.path, spec.shape, config).shard_shape(spec.shape))
            for spec in param_specs(config)}


def _state_bytes(config: LlamaConfig, lora: LoraSettings, mesh: MeshShape) -> tuple[int, int]:
    """(LoRA bytes, optimizer bytes) per device, from the real TrainState's abstract shapes."""
    import jax

    from jora_model.parallel import sharding
    from jora_model.training.step import OptimizerSettings, make_step_functions

    state = make_step_functions(config, lora, OptimizerSettings()).abstract_state
    shardings = sharding.state_shardings(_abstract_mesh(mesh, config), state, config)

    def total(tree, tree_shardings) -> int:
        return sum(_shard_bytes(s, leaf.shape, leaf.dtype.itemsize)
                   for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)))

    return total(state.lora, shardings.lora), total(state.opt_state, shardings.opt_state)


def _step_blocks(step: StepMemoryModel, t: int, batch: int, vocab: int, kernels: str) -> tuple[int, int]:
    """(queries per attention block, tokens per loss chunk): as the step model says, else what the
    kernel set's train step itself uses, so the estimate follows the step's constants when they are
    tuned. The portable set's attention (XLA's, or cuDNN's fused kernel) is counted as one block of
    all T queries: the bound XLA's unfused form reaches."""
    from jora_model.backends import kernels_for
    from jora_model.backends.cpu.attention import block_length

    if step.query_block is not None:
        queries = largest_divisor(t, step.query_block)
    else:
        queries = block_length(t, causal=True) if kernels == "cpu" else t
    if step.logits_chunk is not None:
        return queries, largest_divisor(t, max(1, step.logits_chunk // (batch * vocab)))
    return queries, kernels_for(kernels, "cpu").loss_chunk(batch, t, vocab)


def activation_terms(config: LlamaConfig, *, seq_len: int, batch_size: int, mesh: MeshShape,
                     lora: LoraSettings, grad_accum: int = 1, step: StepMemoryModel = DEFAULT_STEP,
                     kernels: str = "cpu") -> dict[str, int]:
    """The named terms of the activation estimate, in bytes per device (see StepMemoryModel)."""
    b, t, d = batch_size // mesh.data, seq_len, config.dim
    e, m = config.head_dim, mesh.model
    h_m, f_m, v_m = config.n_heads // m, config.ffn_dim // m, config.vocab_size // m
    k_m = max(config.n_kv_heads // m, 1)  # a model axis wider than the KV heads: one per device
    fan_in = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": h_m * e, "gate_proj": d, "up_proj": d,
              "down_proj": f_m}
    per_token = (d * step.hidden + sum(fan_in[name] for name in lora.targets) * step.dropout_input
                 + len(lora.targets) * lora.r * step.lora_mid + (h_m + 2 * k_m) * e * step.qkv + f_m * step.mlp)
    tokens = b * t
    # b and V as the step sees them: the whole batch and vocabulary
    queries, chunk = _step_blocks(step, t, batch_size, config.vocab_size, kernels)
    scores = b * h_m * queries * t
    return {
        "saved_layer_inputs": config.n_layers * tokens * d * step.saved_input,  # remat only
        "saved_attention": config.n_layers * tokens * h_m * (e * step.saved_attention + step.saved_statistics),
        "saved_projections": config.n_layers * tokens * ((h_m + 2 * k_m) * e + d + 2 * f_m) * step.saved_projections,
        "layer_saved": tokens * per_token,  # per layer, without remat
        "attention_backward": scores * step.scores_backward,  # one layer's, rebuilt in its backward
        "model_parallel_reduce": tokens * d * step.model_parallel_reduce if m > 1 else 0,
        "logits": b * chunk * v_m * step.logits,
        "head_copies_with_accum": d * v_m * step.head_copies_with_accum if grad_accum > 1 else 0,
    }


def combine_activations(terms: dict[str, int], n_layers: int, remat: str) -> int:
    """Activation bytes from the terms for a remat policy: the head and one layer's backward are never
    live at once, so only the larger counts; without remat every layer's intermediates are live at both."""
    common = terms["head_copies_with_accum"]
    if check_policy(remat) != "none":  # one layer rebuilt: its intermediates and its attention backward
        layer = terms["layer_saved"] + terms["attention_backward"] + terms["model_parallel_reduce"]
        saved = terms["saved_layer_inputs"] + terms["saved_attention"]
        if remat == "matmuls":
            saved += terms["saved_projections"]
        return common + saved + max(terms["logits"], layer)
    return (common + n_layers * terms["layer_saved"]
            + max(terms["logits"], terms["attention_backward"] + terms["model_parallel_reduce"]))


def plan_memory(config: LlamaConfig, *, seq_len: int, batch_size: int, mesh: MeshShape, lora: LoraSettings,
                remat: str = "matmuls", param_dtype: str = "bfloat16", device_memory: int | None = None,
                grad_accum: int = 1, step: StepMemoryModel = DEFAULT_STEP, kernels: str = "cpu") -> MemoryPlan:
    """The bytes per device of training `config` with `lora` at batch_size rows of seq_len tokens
    (per micro-batch, over the whole data axis) on `mesh`; fits when device_memory is given. `kernels`
    is the set the step runs (resolved: cpu or portable); the step model was fitted to the cpu set's
    step on XLA:CPU, and the portable set's plan uses the same terms with its own blocks."""
    kernels = resolve_kernels(kernels, "cpu")
    if param_dtype not in _DTYPE_BYTES:
        raise JoraError(f"param dtype must be bfloat16 or float32, got {param_dtype!r}")
    for name, value in (("sequence length", seq_len), ("batch size", batch_size), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or value < 1:
            raise JoraError(f"{name} must be a positive integer, got {value!r}")
    check_divisible(config, mesh, batch_size)
    shards = frozen_shards(config, mesh)
    itemsize = _DTYPE_BYTES[param_dtype]
    frozen = sum(math.prod(shape) for shape in shards.values()) * itemsize
    layer_matrices = sum(math.prod(shape) for path, shape in shards.items()
                         if path.startswith("layers/") and path.endswith("/w"))
    copy_bytes = step.layer_weight_copy if check_policy(remat) != "none" else step.layer_weight_copy_no_remat
    # a copy XLA's CPU compiler makes (fitted with bf16 weights); none for the portable set
    copies = layer_matrices * copy_bytes * itemsize // 2 if kernels == "cpu" else 0
    lora_bytes, optimizer_bytes = _state_bytes(config, lora, mesh)
    rows = (batch_size // mesh.data) * grad_accum
    batch_bytes = rows * seq_len * (4 + 1 + 4)  # int32 ids, bool mask, int32 segment ids
    terms = activation_terms(config, seq_len=seq_len, batch_size=batch_size, mesh=mesh, lora=lora,
                             grad_accum=grad_accum, step=step, kernels=kernels)
    by_remat = {policy: combine_activations(terms, config.n_layers, policy) for policy in POLICIES}
    activations = by_remat[remat]
    total = frozen + lora_bytes + optimizer_bytes + 2 * lora_bytes + batch_bytes + copies + activations
    return MemoryPlan(
        mesh=mesh, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, remat=remat,
        param_dtype=param_dtype, frozen_bytes_per_device=frozen, lora_bytes_per_device=lora_bytes,
        optimizer_bytes_per_device=optimizer_bytes, gradient_bytes_per_device=2 * lora_bytes,
        batch_bytes_per_device=batch_bytes, weight_copy_bytes_per_device=copies,
        activation_bytes_per_device=activations, activation_bytes_by_remat=by_remat, activation_terms=terms,
        total_bytes_per_device=total,
        device_memory=device_memory, fits=None if device_memory is None else total <= device_memory)


def candidate_meshes(config: LlamaConfig, devices: int, batch_size: int) -> list[MeshShape]:
    """Every data x model split of `devices` that the model's shapes and the batch allow."""
    out = []
    for model in range(1, devices + 1):
        if devices % model:
            continue
        mesh = MeshShape(data=devices // model, model=model)
        try:
            check_divisible(config, mesh, batch_size)
        except JoraError:
            continue
        out.append(mesh)
    return out


def meshes_that_fit(config: LlamaConfig, devices: int, *, seq_len: int, batch_size: int, lora: LoraSettings,
                    device_memory: int, remat: str = "matmuls", param_dtype: str = "bfloat16",
                    grad_accum: int = 1, step: StepMemoryModel = DEFAULT_STEP,
                    kernels: str = "cpu") -> list[MemoryPlan]:
    """The meshes over all `devices` on which the step fits, best first. Best = the most data
    parallelism (each extra model shard adds all-reduces to every layer, while data shards run
    independently until the gradient sum, so throughput is highest with the fewest model shards);
    ties go to the smaller total."""
    if not isinstance(devices, int) or devices < 1:
        raise JoraError(f"device count must be a positive integer, got {devices!r}")
    plans = [plan_memory(config, seq_len=seq_len, batch_size=batch_size, mesh=mesh, lora=lora, remat=remat,
                         param_dtype=param_dtype, device_memory=device_memory, grad_accum=grad_accum, step=step,
                         kernels=kernels)
             for mesh in candidate_meshes(config, devices, batch_size)]
    return sorted((p for p in plans if p.fits), key=lambda p: (-p.mesh.data, p.total_bytes_per_device))
