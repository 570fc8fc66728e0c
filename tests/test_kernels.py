"""The two kernel sets (jora_model/backends): chosen once from the settings and the platform, and in
agreement. fp32 logits of the cpu and portable sets may differ only by the order of their sums: both
compute the same softmax attention and products in fp32, whose rounding moves logits of this size
by ~1e-6, so 1e-4 is tight enough that any real difference (a mask, a head grouping, a scale) fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jora_model.backends import kernels_for, resolve_kernels
from jora_model.errors import JoraError
from jora_model.formats.store import Store, load_params
from jora_model.model import llama
from jora_model.model.lora import LoraSettings, init_lora_params, merge_params
from tests.train_helpers import tiny_store

ROOT = Path(__file__).resolve().parents[1]


def test_auto_is_cpu_on_a_cpu_and_portable_elsewhere():
    assert resolve_kernels("auto", "cpu") == "cpu"
    assert resolve_kernels("auto", "gpu") == resolve_kernels("auto", "tpu") == "portable"
    assert resolve_kernels("portable", "cpu") == "portable" and resolve_kernels("cpu", "gpu") == "cpu"
    assert resolve_kernels("auto") == "cpu"  # this machine's default backend
    bf16 = np.dtype(jnp.bfloat16)
    assert kernels_for("cpu").frozen_dtype(bf16, True) == np.uint16  # stacked bf16 layers as bits
    assert kernels_for("cpu").frozen_dtype(bf16, False) == kernels_for("portable", "cpu").frozen_dtype(bf16, True) == bf16
    with pytest.raises(JoraError, match="kernels must be one of auto, cpu, portable"):
        resolve_kernels("cuda")


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_model):
    """The tiny store's fp32 weights with an adapter whose B is not zero, so LoRA's path counts."""
    store = Store(tiny_store(tmp_path_factory.mktemp("kernels"), tokenizer_model)[1])
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    adapter = init_lora_params(store.config, lora, 0)
    rng = np.random.default_rng(3)
    for leaves in adapter.values():
        leaves["lora_b"] = rng.normal(scale=0.05, size=leaves["lora_b"].shape).astype(np.float32)
    params = merge_params(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), load_params(store)), adapter)
    return store.config, lora, params


def _logits(model, kernels: str, segments) -> np.ndarray:
    config, lora, params = model
    options = llama.ModelOptions("float32", lora=lora, kernels=kernels)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, segments.shape), jnp.int32)
    return np.asarray(jax.jit(llama.transformed(config, options).apply)(params, None, tokens, segments))


def test_portable_and_cpu_logits_agree_in_fp32(model):
    # two packed segments and padding in row 0, one segment in row 1; 64 tokens make 4 causal query
    # blocks in the cpu set's attention
    segments = jnp.asarray([[1] * 30 + [2] * 26 + [0] * 8, [1] * 64], jnp.int32)
    cpu, portable = _logits(model, "cpu", segments), _logits(model, "portable", segments)
    assert np.abs(cpu).max() > 1.0  # logits of a size where 1e-4 is a real bound
    np.testing.assert_allclose(portable, cpu, rtol=0, atol=1e-4)
    # the bound is sharp enough to see the packing: the second segment's logits change by far more
    # than 1e-4 when it may see the first
    unpacked = _logits(model, "portable", jnp.ones_like(segments))
    assert np.abs(unpacked[0, 30:56] - cpu[0, 30:56]).max() > 1e-2


HEAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jora_model.training.loss import losses_from_hidden

    kernels = sys.argv[1]
    mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "model"))
    b, t, d, v = 2, 256, 64, 32000
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "model")))
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=NamedSharding(mesh, P("data")))

    def nll(hidden, w, ids, mask):
        return losses_from_hidden(hidden, w, ids, mask, jnp.ones_like(ids), kernels)[0]

    text = jax.jit(jax.value_and_grad(nll)).lower(hidden, w, ids, mask).compile().as_text()
    ops = ("collective-permute", "all-reduce", "all-gather", "all-to-all", "reduce-scatter")
    print(json.dumps({op: text.count(f" {op}(") + text.count(f" {op}-start(") for op in ops}))
""")


def _head_collectives(kernels: str) -> dict[str, int]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", HEAD_SCRIPT, kernels], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vocabulary_sharded_head_reduces_without_permuting_logit_pieces():
    """On a head sharded over the vocabulary (model=4), the portable set's row max is one small
    all-reduce; the cpu set's tree of maxima over halves moves logit pieces between devices, which is
    what this count would catch if the portable set used it."""
    portable = _head_collectives("portable")
    assert portable["collective-permute"] == 0, portable
    assert 1 <= portable["all-reduce"] <= 8, portable  # row max, row sum, picked logit; the gradient's sum
    cpu = _head_collectives("cpu")
    assert cpu["collective-permute"] > 0, cpu


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jora_model.model.config import LlamaConfig
    from jora_model.model.lora import LoraSettings, init_lora_params
    from jora_model.parallel import sharding
    from jora_model.training.bench import random_frozen
    from jora_model.training.step import OptimizerSettings, make_step_functions

    config = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 256, (1, 2, 32)).astype(np.int32),
             "loss_mask": np.ones((1, 2, 32), bool), "segment_ids": np.ones((1, 2, 32), np.int32)}
    out = {}
    for name, shape, devices in (("one", sharding.MeshShape(1, 1), jax.devices()[:1]),
                                 ("mesh", sharding.MeshShape(1, 2), jax.devices())):
        mesh = sharding.make_mesh(shape, devices)
        fns = make_step_functions(config, lora, OptimizerSettings(lr=1e-2, total_steps=3), "float32", "matmuls",
                                  mesh=mesh, kernels="portable")
        frozen = random_frozen(config, mesh, "float32", step_dtype=fns.frozen_dtype)
        state = fns.init(jax.device_put(init_lora_params(config, lora, 0), fns.state_shardings.lora))
        placed = jax.device_put(batch, sharding.batch_sharding(mesh))
        losses = []
        for _ in range(3):
            state, metrics = fns.train_step(state, frozen, placed)
            losses.append(float(metrics.loss))
        out[name] = losses
    print(json.dumps(out))
""")


def test_portable_step_on_a_model_parallel_mesh_matches_one_device():
    """Three fp32 steps of the portable set with heads, MLP and vocabulary split over 2 devices give
    one device's losses (sums in another order: ~1e-6 relative; a wrong split moves them by far more)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = json.loads(out.stdout.strip().splitlines()[-1])
    assert losses["one"][2] < losses["one"][0]  # the adapter trains, so step 3 depends on steps 1 and 2
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-4)


def test_jora_train_with_portable_kernels_trains_what_the_cpu_kernels_train(tmp_path, tokenizer_model):
    """The whole `jora train` path with --kernels portable (settings, setup, the frozen base loaded in the
    set's dtypes, the loop): in fp32 its losses are the cpu set's up to summation order (1e-4 relative;
    a wrongly loaded weight, e.g. bf16 bits read as numbers, moves them by orders of magnitude), and the
    adapter records the set it was asked for."""
    from tests.test_train_stage import COMMON, _train
    from tests.train_helpers import tiny_data

    _, store = tiny_store(tmp_path, tokenizer_model, dtype="bf16")
    data = tiny_data(tmp_path, tokenizer_model)
    losses = {}
    for kernels in ("cpu", "portable"):
        out = tmp_path / kernels
        run = subprocess.run(_train(store, data, out, "--kernels", kernels, "--compute-dtype", "float32",
                                    "--max-steps", "4", "--checkpoint-every", "4"), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        losses[kernels] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        meta = json.loads((out / "adapter" / "adapter.json").read_text())
        assert meta["train_settings"]["kernels"] == kernels
    assert len(losses["cpu"]) == 4
    np.testing.assert_allclose(losses["portable"], losses["cpu"], rtol=1e-4)
