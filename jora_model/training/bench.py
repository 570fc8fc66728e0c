"""`jora bench`: time the real train step on random weights of a given shape (nothing read from disk).

Model FLOPs of one LoRA step over T tokens of a batch (the convention of the PaLM/MFU papers, adapted
to a frozen base): the forward costs 2 N T for the N matmul parameters (lm_head included, embedding
lookup excluded) plus 4 L T^2 D for attention scores and values; the backward of a frozen base needs
only activation gradients, about the same again. LoRA's own matmuls and rematerialisation are not
counted. So model FLOPs = 2 x forward; dividing by step time gives model FLOP/s, reported beside the
machine's measured peak for a large matmul in the same dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import statistics
import time
from typing import Any

import numpy as np

from jora_model.model.config import LlamaConfig, preset
from jora_model.model.lora import LoraSettings, init_lora_params
from jora_model.schema import same_as, setting
from jora_model.training.settings import TrainSettings


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    preset: str = setting("small", "model shape: tiny, small, base110m, 7B, 13B or 70B")
    seq: int = setting(512, "tokens per row", ge=8)
    batch: int = setting(1, "rows per micro-batch", ge=1)
    grad_accum: int = same_as(TrainSettings, "grad_accum", default=1)
    steps: int = setting(10, "timed steps", ge=1)
    warmup: int = setting(2, "untimed steps (compilation)", ge=0)
    mesh: str = same_as(TrainSettings, "mesh")
    compute_dtype: str = same_as(TrainSettings, "compute_dtype")
    param_dtype: str = setting("bfloat16", "dtype of the frozen weights", choices=("bfloat16", "float32"))
    remat: str = same_as(TrainSettings, "remat")
    kernels: str = same_as(TrainSettings, "kernels")
    lora: LoraSettings = LoraSettings()


def model_flops_per_step(config: LlamaConfig, tokens_per_row: int, rows: int) -> float:
    d, f, e = config.dim, config.ffn_dim, config.head_dim
    per_layer = d * config.n_heads * e * 2 + d * config.n_kv_heads * e * 2 + 3 * d * f
    matmul_params = config.n_layers * per_layer + d * config.vocab_size
    forward = 2 * matmul_params * tokens_per_row * rows + 4 * config.n_layers * tokens_per_row ** 2 * d * rows
    return 2.0 * forward


def matmul_peak_flops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an n^3 matmul (fp32 accumulation) on the first device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def random_frozen(config: LlamaConfig, mesh, dtype: str, seed: int = 0, step_dtype=None) -> dict:
    """Random base weights, std 1/sqrt(fan_in), created on their devices already sharded; with
    `step_dtype` (a kernel set's frozen_dtype), in the dtypes the step takes them in, as the trainer
    loads them (store.load_params)."""
    import jax
    import jax.numpy as jnp

    from jora_model.parallel import sharding
    from jora_model.formats.layout import param_specs

    def make(key, shape, std, to):
        x = jnp.ones(shape, dtype) if std is None else (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
        return jax.lax.bitcast_convert_type(x, to) if to != x.dtype else x

    # one program per distinct (shape, scale, dtype, placement), the key an argument: a 7B model has
    # hundreds of tensors but only a handful of shapes
    programs: dict[Any, Any] = {}
    params: dict[str, dict[str, Any]] = {}
    key = jax.random.PRNGKey(seed)
    for i, spec in enumerate(param_specs(config)):
        target = sharding.param_sharding(mesh, spec.path, spec.shape, config)
        std = None if spec.name == "scale" else 1.0 if spec.name == "embeddings" else spec.shape[-2] ** -0.5
        to = step_dtype(jnp.dtype(dtype), spec.stacked) if step_dtype else jnp.dtype(dtype)
        program = programs.setdefault((tuple(spec.shape), std, str(to), target), jax.jit(
            functools.partial(make, shape=tuple(spec.shape), std=std, to=to), out_shardings=target))
        params.setdefault(spec.module, {})[spec.name] = program(jax.random.fold_in(key, i))
    return params


class PreparedStep:
    """The real train step compiled for `settings`, with random weights, a fresh adapter and one
    random batch in place; `run()` takes one optimizer step and returns its loss (waiting for it).
    Shared by run_bench and benchmarks/paired_peft.py, which alternates it with PEFT's step."""

    def __init__(self, settings: BenchSettings):
        import jax

        from jora_model.parallel import sharding
        from jora_model.training.step import OptimizerSettings, abstract_arguments, make_step_functions
        from jora_model.training.setup import mesh_shape

        self.config = config = preset(settings.preset)
        self.mesh_shape = shape = mesh_shape(settings.mesh)
        sharding.check_divisible(config, shape, settings.batch)
        self.mesh = mesh = sharding.make_mesh(shape, config=config)
        optimizer = OptimizerSettings(total_steps=max(settings.steps + settings.warmup, 1))
        self.fns = fns = make_step_functions(config, settings.lora, optimizer, settings.compute_dtype,
                                             settings.remat, mesh=mesh, kernels=settings.kernels)
        shape3 = (settings.grad_accum, settings.batch, settings.seq)
        # compiled before the weights exist, as the trainer does (see AheadOfTime.prepare)
        fns.train_step.prepare(*abstract_arguments(config, fns, mesh, shape3, settings.param_dtype))
        self.frozen = random_frozen(config, mesh, settings.param_dtype, step_dtype=fns.frozen_dtype)
        lora = init_lora_params(config, settings.lora, 0)
        self.state = fns.init(jax.device_put(lora, fns.state_shardings.lora))
        rng = np.random.default_rng(0)
        self.batch = jax.device_put({
            "input_ids": rng.integers(0, config.vocab_size, shape3, dtype=np.int32),
            "loss_mask": np.ones(shape3, bool), "segment_ids": np.ones(shape3, np.int32)},
            sharding.batch_sharding(mesh))

    def run(self) -> float:
        self.state, metrics = self.fns.train_step(self.state, self.frozen, self.batch)
        return float(metrics.loss)  # waits for the step


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    import jax

    prepared = PreparedStep(settings)
    config, fns = prepared.config, prepared.fns
    times, cpu_times = [], []
    loss = float("nan")
    for i in range(settings.warmup + settings.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = prepared.run()
        if i >= settings.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if fns.train_step.compiled_signatures != 1:  # the prepared program must be the one that ran
        raise RuntimeError(f"the step compiled {fns.train_step.compiled_signatures} times; expected once")
    step_s = statistics.median(times)
    tokens = settings.seq * settings.batch * settings.grad_accum
    flops = model_flops_per_step(config, settings.seq, settings.batch * settings.grad_accum) / step_s
    peak = matmul_peak_flops(settings.compute_dtype)
    device = jax.devices()[0]

    def bytes_on(tree) -> int:
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
                   if s.device == device)

    out = {
        "preset": settings.preset, "seq": settings.seq, "batch": settings.batch, "grad_accum": settings.grad_accum,
        "mesh": str(prepared.mesh_shape), "devices": len(jax.devices()), "platform": device.platform,
        "compute_dtype": settings.compute_dtype, "param_dtype": settings.param_dtype, "remat": settings.remat,
        "kernels": fns.kernels,
        "median_step_s": step_s, "min_step_s": min(times), "tokens_per_s": tokens / step_s,
        # CPU time of all this process's threads per step: on a shared machine it moves less with
        # other jobs than wall time does (contention stretches a step, not the work in it)
        "median_step_cpu_s": statistics.median(cpu_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "frozen_bytes_per_device": bytes_on(prepared.frozen),
        "trainable_state_bytes_per_device": bytes_on(prepared.state),
        "params": config.param_count(), "model_flops_per_s": flops, "matmul_peak_flops_per_s": peak,
        "fraction_of_matmul_peak": flops / peak, "final_loss": loss,
    }
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = stats["peak_bytes_in_use"]
    return out
