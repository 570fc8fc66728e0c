"""A model axis wider than the KV heads: the query heads split over all of it, each KV head (k_proj,
v_proj and LoRA's B on them) is copied on the devices whose query heads read it, and training gives
what one device gives.

The training runs are subprocesses with their own virtual CPU device count (XLA reads the flag at
start-up). fp32 compute, remat off: the sharded step sums its matmuls in another order, which moves an
fp32 loss by ~1e-7 relative and an adapter entry (up to ~0.1 after 4 AdamW steps of lr 1e-3) by ~1e-7,
so 1e-5 relative (losses) and 1e-6 absolute (adapter) leave room for that and for nothing a KV head
read by the wrong queries, or a KV gradient summed over too few devices, would cause.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jora_model.errors import JoraError
from jora_model.model.config import PRESETS, LlamaConfig
from jora_model.model.lora import LoraSettings
from jora_model.parallel import sharding
from jora_model.training.memory_plan import plan_memory
from tests.train_helpers import tiny_data, tiny_store

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    from jora_model.model.lora import LoraSettings
    from jora_model.parallel import distributed
    from jora_model.training.setup import setup_training
    from jora_model.training.trainer import TrainSettings, run_training

    store, data, work, mesh = sys.argv[1:5]
    settings = TrainSettings(lora=LoraSettings(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "down_proj")),
                             lr=1e-3, batch_size=2, grad_accum=2, max_seq_len=256, max_steps=4, eval_every=4,
                             checkpoint_every=4, mesh=mesh, compute_dtype="float32", remat="none")
    result = run_training(Path(store), Path(data), Path(work), settings, progress=False)
    losses = [r["loss"] for r in map(json.loads, (Path(work) / "metrics.jsonl").read_text().splitlines())]
    # the finished run's own arrays, as the trainer placed them: the frozen base and the resumed state
    done = setup_training(Path(store), Path(data), Path(work), settings, None, distributed.current_team())
    share = lambda a: sorted({x.data.size / a.size for x in a.addressable_shards})
    fractions = {f"{module}/{name}": share(a) for module, leaves in done.frozen.items() for name, a in leaves.items()}
    fractions.update({f"{module}/{name}": share(a) for module, leaves in done.state.lora.items()
                      for name, a in leaves.items()})
    # the output columns each device holds, in the mesh's device order (its model axis, data=1)
    def columns(a):
        held = {x.device: (x.index[-1].start or 0, x.index[-1].stop or a.shape[-1]) for x in a.addressable_shards}
        return [held[d] for d in done.mesh.devices.flat]
    attention = done.frozen["layers/attention/q_proj"], done.frozen["layers/attention/k_proj"]
    print(json.dumps({"losses": losses, "eval": result.eval_loss, "devices": len(jax.devices()),
                      "adapter": str(result.adapter), "fractions": fractions, "mesh": done.mesh.axis_names,
                      "q_columns": columns(attention[0]["w"]), "k_columns": columns(attention[1]["w"])}))
""")


def _run(store, data, work, mesh, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(store), str(data), str(work), mesh],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _adapter(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(path) / "adapter.safetensors"))


def test_model_axis_wider_than_kv_heads_trains_as_one_device(tmp_path, tokenizer_model):
    _, store = tiny_store(tmp_path, tokenizer_model, n_heads=8, n_kv_heads=2)
    data = tiny_data(tmp_path, tokenizer_model, n=20)
    one = _run(store, data, tmp_path / "one", "model=1", 1)
    four = _run(store, data, tmp_path / "four", "model=4", 4)
    assert four["devices"] == 4 and len(four["losses"]) == len(one["losses"]) == 4
    for ours, ref in zip(four["losses"], one["losses"]):
        assert abs(ours - ref) <= 1e-5 * abs(ref), (four["losses"], one["losses"])
    assert abs(four["eval"] - one["eval"]) <= 1e-5 * abs(one["eval"])
    ours, ref = _adapter(four["adapter"]), _adapter(one["adapter"])
    assert ours.keys() == ref.keys() and any(".k_proj." in k for k in ref)
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
    assert max(float(np.abs(ref[k]).max()) for k in ref if k.endswith("lora_b")) > 1e-3  # it did train

    fractions = four["fractions"]
    assert four["mesh"] == ["data", "kv_group", "kv_copy"]
    for path in ("k_proj/w", "v_proj/w", "k_proj/lora_b", "v_proj/lora_b"):  # one of the 2 KV heads each
        assert fractions[f"layers/attention/{path}"] == [0.5], (path, fractions[f"layers/attention/{path}"])
    assert fractions["layers/attention/k_proj/lora_a"] == fractions["layers/attention/v_proj/lora_a"] == [1.0]
    # device i holds query heads 2i, 2i+1 (of 8, width 8 each) and KV head i // 2, which they read
    head = 8
    assert four["q_columns"] == [[2 * i * head, (2 * i + 2) * head] for i in range(4)]
    assert four["k_columns"] == [[(i // 2) * head, (i // 2 + 1) * head] for i in range(4)]
    for path in ("layers/attention/q_proj/w", "layers/attention/o_proj/w", "layers/mlp/gate_proj/w",
                 "layers/mlp/up_proj/w", "layers/mlp/down_proj/w", "embed/embeddings", "lm_head/w",
                 "layers/attention/q_proj/lora_b", "layers/attention/o_proj/lora_a",
                 "layers/mlp/down_proj/lora_a"):
        assert fractions[path] == [0.25], (path, fractions[path])  # heads, MLP units, vocabulary: split


def test_model_axis_splits_only_where_wider_than_the_kv_heads():
    from jax.sharding import AbstractMesh

    config = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=48)
    for model in (1, 2):  # K divides the model axis: today's mesh and rules
        shape = sharding.MeshShape(2, model)
        sharding.check_divisible(config, shape)
        assert sharding.mesh_axes(shape, config) == ((2, model), ("data", "model"))
    for model in (4, 8):
        shape = sharding.MeshShape(2, model)
        sharding.check_divisible(config, shape)
        mesh = AbstractMesh(*sharding.mesh_axes(shape, config))
        assert mesh.axis_names == ("data", "kv_group", "kv_copy") and sharding.model_size(mesh) == model
        rules = sharding.mesh_rules(mesh)
        assert rules["kv_heads"] == "kv_group" and rules["batch"] == "data"
        assert rules["heads"] == rules["mlp"] == rules["vocab"] == ("kv_group", "kv_copy")
    plain = AbstractMesh((2, 4), ("data", "model"))
    assert sharding.mesh_rules(plain) == sharding.LOGICAL_TO_MESH


def test_a_mesh_without_the_kv_split_is_refused_in_one_line():
    from jax.sharding import AbstractMesh

    config = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=48)
    with pytest.raises(JoraError) as caught:  # what make_mesh(shape) without the config would build
        sharding.param_sharding(AbstractMesh((1, 4), ("data", "model")), "layers/attention/k_proj/w",
                                (1, 32, 8), config)
    assert "\n" not in str(caught.value) and "2 key/value heads on model=4" in str(caught.value)


@pytest.mark.parametrize("config,model,what", [
    (LlamaConfig(vocab_size=48, dim=32, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=48), 16, "8 query heads"),
    (LlamaConfig(vocab_size=48, dim=48, n_layers=1, n_heads=12, n_kv_heads=4, ffn_dim=48), 6,
     "4 key/value heads, nor is it a multiple of them"),
    (PRESETS["llama3.1-405B"], 256, "128 query heads"),
])
def test_model_axis_the_heads_cannot_split_is_refused_in_one_line(config, model, what):
    with pytest.raises(JoraError) as caught:
        sharding.check_divisible(config, sharding.MeshShape(1, model))
    message = str(caught.value)
    assert "\n" not in message and f"model={model} does not divide the model's {what}" in message


def _frozen_bytes_by_hand(c: LlamaConfig, m: int) -> int:
    """bf16 frozen weights per device: q, o, MLP, embedding and head split m ways, k and v K ways."""
    e = c.dim // c.n_heads
    per_layer = (2 * c.dim * c.n_heads * e // m  # q_proj, o_proj
                 + 2 * c.dim * e  # k_proj, v_proj: one KV head each
                 + 3 * c.dim * c.ffn_dim // m  # gate, up, down
                 + 2 * c.dim)  # the two norms
    return 2 * (c.n_layers * per_layer + 2 * c.vocab_size * c.dim // m + c.dim)


def test_plan_for_405b_on_model_16_counts_one_kv_head_per_device():
    c = PRESETS["llama3.1-405B"]
    assert (c.n_heads, c.n_kv_heads, c.tie_word_embeddings) == (128, 8, False)
    e, r, t = c.dim // c.n_heads, 16, 2000
    lora = LoraSettings(r=r, targets=("q_proj", "k_proj", "v_proj"))
    plan = plan_memory(c, seq_len=t, batch_size=1, mesh=sharding.MeshShape(1, 16), lora=lora,
                       device_memory=80 * 10 ** 9)
    assert plan.frozen_bytes_per_device == _frozen_bytes_by_hand(c, 16)
    # LoRA (fp32): every A [D, r] whole; q's B [r, H E] split 16 ways, k's and v's B [r, K E] 8 ways
    lora_elements = c.n_layers * (3 * c.dim * r + r * c.n_heads * e // 16 + 2 * r * e)
    assert plan.lora_bytes_per_device == 4 * lora_elements
    # remat "matmuls" keeps q, k, v per layer: 128 / 16 query heads and one KV head each of k and v
    kept = c.n_layers * t * ((c.n_heads // 16 + 2) * e + c.dim + 2 * c.ffn_dim // 16) * 2
    assert plan.activation_terms["saved_projections"] == kept
    # at model=8 each device holds one KV head too (of 8 split 8 ways): the same hand count holds
    eight = plan_memory(c, seq_len=t, batch_size=1, mesh=sharding.MeshShape(1, 8), lora=lora)
    assert eight.frozen_bytes_per_device == _frozen_bytes_by_hand(c, 8)


def test_plan_for_70b_on_model_16():
    c = PRESETS["llama3-70B"]
    plan = plan_memory(c, seq_len=2000, batch_size=1, mesh=sharding.MeshShape(1, 16), lora=LoraSettings(),
                       device_memory=80 * 10 ** 9)
    assert plan.frozen_bytes_per_device == _frozen_bytes_by_hand(c, 16) and plan.fits


@pytest.mark.parametrize("name", ["llama3.1-405B", "llama3-70B"])
def test_jora_plan_on_model_16(name, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import cli

    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(cli, ["plan", "--preset", name, "--seq", "2000", "--batch", "1", "--mesh",
                                   "data=1,model=16", "--device-memory", "80GB", "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.stdout)
    assert plan["mesh"] == "data=1,model=16"
    assert plan["frozen_bytes_per_device"] == _frozen_bytes_by_hand(PRESETS[name], 16)
