"""The training step: a factory that closes over nothing global and returns jitted functions.

State is (step, LoRA params in fp32, optimizer state). The frozen base is an argument, never a
closure: jit sees it as a (sharded, bf16) input, not a constant baked into the program. A step takes
[A, B, T] micro-batches, sums the token losses and their gradients over all A micro-batches, and
divides by the number of loss tokens in the whole accumulated batch, so accumulation 4 x batch 1
equals batch 4. Dropout keys are fold_in(seed, step): a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jora_model.backends import kernels_for, resolve_kernels
from jora_model.model.config import LlamaConfig
from jora_model.model.llama import ModelOptions, transformed
from jora_model.model.lora import LoraSettings, merge_params, target_specs
from jora_model.parallel import sharding
from jora_model.training.compiled import AheadOfTime
from jora_model.training.loss import head_weight, losses_from_hidden


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # linear warmup from 0 to lr
    total_steps: int = 1  # cosine decay from lr to 0 over the run
    weight_decay: float = 0.0  # AdamW's decoupled decay (PEFT/Trainer default 0)
    max_grad_norm: float = 1.0  # clip the global gradient norm
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def schedule(s: OptimizerSettings) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at total_steps."""
    warmup = min(s.warmup_steps, max(s.total_steps - 1, 0))
    if warmup == 0:
        return optax.cosine_decay_schedule(s.lr, max(s.total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, s.total_steps, end_value=0.0)


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(s.max_grad_norm),
                       optax.adamw(schedule(s), s.b1, s.b2, s.eps, weight_decay=s.weight_decay))


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    lora: dict  # fp32 master copy of the adapter
    opt_state: Any


class StepMetrics(NamedTuple):
    loss: jax.Array  # mean token loss over the accumulated batch
    tokens: jax.Array  # loss tokens in it
    grad_norm: jax.Array  # before clipping
    lr: jax.Array  # learning rate used for this step


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    init: Callable  # (lora params) -> TrainState
    train_step: Callable  # (state, frozen, batch dict [A, B, T]) -> (state, StepMetrics)
    eval_step: Callable  # (lora, frozen, batch dict [B, T]) -> (nll sum, tokens)
    optimizer: optax.GradientTransformation
    abstract_state: Any = None  # shapes and dtypes of the TrainState (a checkpoint's template)
    state_shardings: Any = None  # a TrainState of shardings, when built for a mesh
    kernels: str = "cpu"  # the backend kernel set the step runs (resolved: cpu or portable)
    frozen_dtype: Callable | None = None  # (stored dtype, stacked) -> the dtype the step takes a frozen tensor in


def mesh_platform(mesh: Any) -> str:
    """The platform of the mesh's devices (JAX's default backend without a mesh)."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def make_step_functions(config: LlamaConfig, lora: LoraSettings, optimizer: OptimizerSettings,
                        compute_dtype: str = "bfloat16", remat: str = "matmuls", seed: int = 420,
                        mesh: Any = None, kernels: str = "auto") -> StepFunctions:
    """With a mesh, the state is placed by the sharding rules (sharding.state_shardings) and the step
    keeps it there, donating the old buffers to the new state. `kernels` is resolved once, here, from
    the mesh's platform."""
    kernels = resolve_kernels(kernels, mesh_platform(mesh))
    ops = kernels_for(kernels, mesh_platform(mesh))
    options = ModelOptions(compute_dtype=compute_dtype, lora=lora, remat=remat, kernels=kernels)
    model = transformed(config, options)
    tx = make_optimizer(optimizer)
    lr_at = schedule(optimizer)
    base_key = jax.random.PRNGKey(seed)

    def losses(params, key, batch, training):
        hidden = model.apply(ops.encode_frozen(params), key, batch["input_ids"], batch["segment_ids"], None,
                             training, True)
        head, vocab_major = head_weight(params, config)
        return losses_from_hidden(hidden, head, batch["input_ids"], batch["loss_mask"],
                                  batch["segment_ids"], kernels, vocab_major)

    def micro_loss(trainable, frozen, micro, key):
        return losses(merge_params(frozen, trainable), key, micro, True)

    def train_step(state: TrainState, frozen, batch) -> tuple[TrainState, StepMetrics]:
        step_key = jax.random.fold_in(base_key, state.step)

        def accumulate(carry, inputs):
            grads, loss_sum, tokens = carry
            micro, index = inputs
            (nll, n), g = jax.value_and_grad(
                lambda t: micro_loss(t, frozen, micro, jax.random.fold_in(step_key, index)), has_aux=True)(state.lora)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + nll, tokens + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.lora)
        n_micro = batch["input_ids"].shape[0]
        (grads, loss_sum, tokens), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (batch, jnp.arange(n_micro)))
        denominator = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.lora)
        new_lora = optax.apply_updates(state.lora, updates)
        metrics = StepMetrics(loss_sum / denominator, tokens, optax.tree.norm(grads), lr_at(state.step))
        return TrainState(state.step + 1, new_lora, opt_state), metrics

    def eval_step(trainable, frozen, batch):
        return losses(merge_params(frozen, trainable), None, batch, False)

    def init(trainable) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))

    abstract_lora = {module: {"lora_a": jax.ShapeDtypeStruct((layers, fan_in, lora.r), jnp.float32),
                              "lora_b": jax.ShapeDtypeStruct((layers, lora.r, fan_out), jnp.float32)}
                     for module, (layers, fan_in, fan_out) in target_specs(config, lora)}
    abstract_state = jax.eval_shape(init, abstract_lora)
    state_shardings = None
    jit_kwargs = {}
    if mesh is not None:
        state_shardings = sharding.state_shardings(mesh, abstract_state, config)
        jit_kwargs["out_shardings"] = (state_shardings, None)
    return StepFunctions(
        init=jax.jit(init, out_shardings=state_shardings) if mesh is not None else jax.jit(init),
        train_step=AheadOfTime(jax.jit(train_step, donate_argnums=(0,), **jit_kwargs), ops),
        eval_step=AheadOfTime(jax.jit(eval_step), ops),
        optimizer=tx,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        kernels=kernels,
        frozen_dtype=ops.frozen_dtype,
    )


def abstract_arguments(config: LlamaConfig, fns: StepFunctions, mesh: Any, batch_shape: tuple[int, int, int],
                       param_dtype: str = "bfloat16") -> tuple[Any, dict, dict]:
    """(state, frozen, batch) for train_step as ShapeDtypeStructs placed by the sharding rules, batch
    [A, B, T]: what the step compiles for, with nothing allocated (memory analysis, planning)."""
    from jora_model.formats.layout import param_specs

    frozen: dict[str, dict[str, Any]] = {}
    for spec in param_specs(config):  # in the dtypes the trainer loads them in (load_params(step_dtype=...))
        frozen.setdefault(spec.module, {})[spec.name] = jax.ShapeDtypeStruct(
            spec.shape, fns.frozen_dtype(jnp.dtype(param_dtype), spec.stacked),
            sharding=sharding.param_sharding(mesh, spec.path, spec.shape, config))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         fns.abstract_state, fns.state_shardings)
    where = sharding.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct(batch_shape, dtype, sharding=where)
             for name, dtype in (("input_ids", jnp.int32), ("loss_mask", jnp.bool_), ("segment_ids", jnp.int32))}
    return state, frozen, batch
