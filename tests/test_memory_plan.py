"""`jora plan` and jora_model.training.memory_plan: exact persistent bytes, activations against XLA's own account.

Persistent figures (frozen weights, LoRA, optimizer state) are exact, so they are compared with a hand
computation from Llama-2-7B's published shapes with no tolerance beyond AdamW's few bytes of counters.
The activation estimate is a model of what the compiled step keeps; it is checked against XLA's
`memory_analysis()` of the real train step for a small shape, within the 25% the issue asks for (the
benchmark, benchmarks/plan_vs_measured.py, shows 1-11% on the small presets). When the train step
changes how much it keeps, that test fails: update StepMemoryModel and rerun the benchmark.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from jora_model.model.config import PRESETS, preset
from jora_model.errors import JoraError
from jora_model.model.lora import LoraSettings
from jora_model.training.memory_plan import candidate_meshes, meshes_that_fit, parse_bytes, plan_memory
from jora_model.model.remat import POLICIES
from jora_model.parallel.sharding import MeshShape
from pipeline.cli import cli

QV16 = LoraSettings(r=16, alpha=16, targets=("q_proj", "v_proj"))

# Llama-2-7B by hand (README, "Will it fit?"): D 4096, L 32, F 11008, V 32000, 32 heads of 128.
D, L, F, V, H, T = 4096, 32, 11008, 32000, 32, 512
# one rebuilt layer's backward: per token the residual stream (fp32 norms and sums 16 + bf16 inputs 4),
# the dropped fp32 inputs of q and v, x @ A for both, q/k/v (bf16 + fp32), the MLP's gate/up/product and gradients;
# per [head, Tq, T] (the largest causal block: Tq = 512 / 4 queries over all T keys) the attention
# backward's recomputed weights and their gradient, fp32 and bf16
LAYER_BACKWARD = T * (20 * D + 2 * 4 * D + 2 * 4 * 16 + 6 * 3 * D + 16 * F) + 12 * H * (T // 4) * T
HAND_7B = {
    "frozen": 6_738_415_616 * 2,  # the published parameter count, bf16
    "lora": L * 2 * (D * 16 + 16 * D) * 4,  # q and v: A [D,16] + B [16,D] per layer, fp32
    # remat "matmuls": every layer's bf16 input, bf16 attention output and its fp32 row max and sum per
    # head, bf16 q, k, v, residual stream after attention, gate and up, plus the larger of the head (one
    # chunk of 128 tokens: 128 x 32000 <= 2^22 logits, fp32 and their bf16 gradient) and one layer's
    # backward
    "activations": L * T * D * 2 + L * T * (D * 2 + H * 8) + L * T * (4 * D + 2 * F) * 2
    + max(128 * V * (4 + 2), LAYER_BACKWARD),
}
HAND_7B["total"] = HAND_7B["frozen"] + 5 * HAND_7B["lora"] + HAND_7B["activations"]


def test_7b_one_device_matches_the_hand_calculation():
    plan = plan_memory(PRESETS["7B"], seq_len=T, batch_size=1, mesh=MeshShape(1, 1), lora=QV16)
    assert plan.frozen_bytes_per_device == HAND_7B["frozen"]
    assert plan.lora_bytes_per_device == HAND_7B["lora"] == 33_554_432
    # AdamW: two fp32 moments like the adapter, plus a few int32 step counters
    assert 0 <= plan.optimizer_bytes_per_device - 2 * HAND_7B["lora"] <= 64
    assert plan.gradient_bytes_per_device == 2 * HAND_7B["lora"]
    assert plan.weight_copy_bytes_per_device == 0  # the step gets the layer weights as bits: no copy
    assert abs(plan.activation_bytes_per_device / HAND_7B["activations"] - 1) <= 0.10
    assert abs(plan.total_bytes_per_device / HAND_7B["total"] - 1) <= 0.10
    by_remat = plan.activation_bytes_by_remat  # the projections' outputs, then every intermediate, kept
    assert by_remat["layer"] < by_remat["matmuls"] == plan.activation_bytes_per_device < by_remat["none"]
    # "layer" keeps the input and attention's output (and statistics) only
    assert by_remat["matmuls"] - by_remat["layer"] == L * T * (4 * D + 2 * F) * 2
    assert plan.fits is None


def test_7b_on_model_8_splits_all_but_the_norms():
    plan = plan_memory(PRESETS["7B"], seq_len=T, batch_size=1, mesh=MeshShape(1, 8), lora=QV16)
    matrices = 2 * V * D + L * (4 * D * D + 3 * D * F)
    norms = L * 2 * D + D
    assert matrices + norms == 6_738_415_616
    assert plan.frozen_bytes_per_device == (matrices // 8 + norms) * 2
    # LoRA's A on q and v reads the replicated residual stream: A whole, B split with the heads
    assert plan.lora_bytes_per_device == L * 2 * (D * 16 + 16 * D // 8) * 4


def test_store_plan_counts_the_stores_tensors(tmp_path, tokenizer_model):
    from jora_model.formats.store import Store
    from tests.train_helpers import tiny_store

    _, store_dir = tiny_store(tmp_path, tokenizer_model, dtype="bf16")
    out = CliRunner().invoke(cli, ["plan", "--model", str(store_dir), "--seq", "64", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    store = Store(store_dir)
    stored = sum(math.prod(store.shape(name)) for name in store.weight_map) * store.dtype.itemsize
    assert result["param_dtype"] == "bfloat16" and result["frozen_bytes_per_device"] == stored


def test_json_has_the_issue_keys_and_they_add_up():
    out = CliRunner().invoke(cli, ["plan", "--preset", "13B", "--seq", "1024", "--batch", "2",
                                   "--mesh", "data=2,model=4", "--device-memory", "80GB", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    keys = ["frozen_bytes_per_device", "lora_bytes_per_device", "optimizer_bytes_per_device",
            "activation_bytes_per_device", "total_bytes_per_device", "fits"]
    assert all(k in result for k in keys)
    parts = ["frozen_bytes_per_device", "lora_bytes_per_device", "optimizer_bytes_per_device",
             "gradient_bytes_per_device", "batch_bytes_per_device", "weight_copy_bytes_per_device",
             "activation_bytes_per_device"]
    assert result["total_bytes_per_device"] == sum(result[k] for k in parts)
    assert result["fits"] is (result["total_bytes_per_device"] <= 80 * 10 ** 9)
    assert result["mesh"] == "data=2,model=4"


def test_table_for_people():
    out = CliRunner().invoke(cli, ["plan", "--preset", "7B", "--seq", "512", "--device-memory", "12GiB"])
    assert out.exit_code == 0, out.output
    assert "frozen weights" in out.stdout and "12.55 GiB" in out.stdout and "fits in 12.00 GiB (12,884,901,888 bytes): no" in out.stdout


def test_meshes_that_fit_are_listed_best_first():
    config, memory = PRESETS["13B"], parse_bytes("20GB")
    fitting = meshes_that_fit(config, 8, seq_len=1024, batch_size=8, lora=QV16, device_memory=memory)
    candidates = candidate_meshes(config, 8, 8)
    assert [str(m) for m in candidates] == ["data=8,model=1", "data=4,model=2", "data=2,model=4", "data=1,model=8"]
    assert 0 < len(fitting) < len(candidates)  # 20 GB per device: some fit, some do not
    assert [p.mesh.data for p in fitting] == sorted((p.mesh.data for p in fitting), reverse=True)
    assert all(p.fits and p.total_bytes_per_device <= memory for p in fitting)
    for mesh in set(candidates) - {p.mesh for p in fitting}:
        assert plan_memory(config, seq_len=1024, batch_size=8, mesh=mesh, lora=QV16,
                           device_memory=memory).fits is False
    out = CliRunner().invoke(cli, ["plan", "--preset", "13B", "--seq", "1024", "--batch", "8", "--devices", "8",
                                   "--device-memory", "20GB", "--json"])
    assert out.exit_code == 0, out.output
    assert [m["mesh"] for m in json.loads(out.stdout)["meshes"]] == [str(p.mesh) for p in fitting]


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10 ** 9
    assert parse_bytes("80GiB") == 80 * 2 ** 30
    assert parse_bytes("1.5 TB") == 1_500_000_000_000
    for bad in ("80XB", "GB", "-1GB", "0"):
        with pytest.raises(JoraError):
            parse_bytes(bad)


@pytest.mark.parametrize("args,message", [
    (["--preset", "70B", "--mesh", "model=128"], "does not divide the model's 64 query heads"),
    (["--preset", "7B", "--mesh", "model=3"], "does not divide"),
    (["--preset", "9B"], "unknown preset '9B'"),
    (["--model", "no-such-store"], "not a jora parameter store"),
    (["--preset", "7B", "--device-memory", "80XB"], "not a size like 80GB"),
    (["--preset", "7B", "--devices", "8"], "give --device-memory too"),
    (["--preset", "7B", "--batch", "3", "--mesh", "data=2"], "batch size 3 is not a multiple of data=2"),
    (["--preset", "7B", "--targets", "q_proj,wq"], "unknown LoRA targets"),
])
def test_bad_settings_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(cli, ["plan", *args])
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def _compiled_temp_bytes(name: str, seq: int, remat: str) -> int:
    """XLA's temp bytes for the real train step (one device), compiled for abstract arguments."""
    import jax

    from jora_model.parallel import sharding
    from jora_model.training.step import OptimizerSettings, abstract_arguments, make_step_functions

    config = preset(name)
    mesh = sharding.make_mesh(MeshShape(1, 1), jax.devices()[:1])
    fns = make_step_functions(config, QV16, OptimizerSettings(), "bfloat16", remat, mesh=mesh)
    arguments = abstract_arguments(config, fns, mesh, (1, 1, seq))
    return fns.train_step.compiled(*arguments).memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", POLICIES)
def test_estimate_within_25_percent_of_xla(remat):
    plan = plan_memory(preset("small"), seq_len=256, batch_size=1, mesh=MeshShape(1, 1), lora=QV16, remat=remat)
    estimated = plan.activation_bytes_per_device + plan.weight_copy_bytes_per_device + plan.gradient_bytes_per_device
    measured = _compiled_temp_bytes("small", 256, remat)
    assert abs(estimated / measured - 1) <= 0.25, (estimated, measured)
