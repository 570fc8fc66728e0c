"""The parameter store's files: readable by the reference safetensors implementation, sliced reads
that touch only the requested part, and refusal of damaged files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from jora_model.errors import JoraError
from jora_model.formats.safetensors_io import PlannedWriter, SafetensorsFile, plan_shards, save_file
from jora_model.formats.store import Store
from stages.convert import ConvertSettings, convert
from tests.oracles.checkpoints import random_hf_llama, write_hf_dir

ROOT = Path(__file__).resolve().parents[1]


def test_our_files_read_by_the_reference_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
               "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
    save_file(tmp_path / "x.safetensors", tensors, {"k": "v"})
    loaded = safetensors.torch.load_file(tmp_path / "x.safetensors")
    assert loaded["b"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["a"].numpy(), tensors["a"])
    np.testing.assert_array_equal(loaded["b"].view(torch.int16).numpy(), tensors["b"].view(np.int16))
    np.testing.assert_array_equal(loaded["c"].numpy(), tensors["c"])


def test_reference_files_read_sliced(tmp_path):
    array = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    safetensors.numpy.save_file({"w": array}, tmp_path / "r.safetensors")
    with SafetensorsFile(tmp_path / "r.safetensors") as f:
        assert f.shape("w") == (4, 6, 8)
        np.testing.assert_array_equal(f.read("w"), array)
        np.testing.assert_array_equal(f.read("w", (slice(1, 3), slice(None), slice(4, 8))), array[1:3, :, 4:8])


def test_planned_writer_streams_in_any_order_and_checks_completeness(tmp_path):
    plan = [("x", np.float32, (2, 2)), ("y", np.float32, (3,))]
    writer = PlannedWriter(tmp_path / "p.safetensors", plan)
    writer.write("y", np.ones(3, np.float32))
    writer.write("x", np.full((2, 2), 2, np.float32))
    writer.close()
    loaded = safetensors.numpy.load_file(tmp_path / "p.safetensors")
    assert loaded["x"].sum() == 8 and loaded["y"].sum() == 3
    partial = PlannedWriter(tmp_path / "q.safetensors", plan)
    partial.write("x", np.zeros((2, 2), np.float32))
    with pytest.raises(JoraError, match="never written: y"):
        partial.close()
    with pytest.raises(JoraError, match="shape"):
        PlannedWriter(tmp_path / "r.safetensors", plan).write("x", np.zeros((3, 2), np.float32))


def test_plan_shards_bounds_file_size():
    entries = [(f"t{i}", np.float32, (256,)) for i in range(10)]  # 1 KiB each
    shards = plan_shards(entries, 3 * 1024)
    assert [len(s) for s in shards] == [3, 3, 3, 1]
    assert [len(s) for s in plan_shards([("big", np.float32, (4096,))] + entries[:1], 1024)] == [1, 1]


@pytest.mark.parametrize("cut", ["truncated", "header"])
def test_damaged_safetensors_named(tmp_path, cut):
    save_file(tmp_path / "d.safetensors", {"w": np.ones((64, 64), np.float32)})
    data = (tmp_path / "d.safetensors").read_bytes()
    (tmp_path / "d.safetensors").write_bytes(data[:-100] if cut == "truncated" else data[:8] + b"{nonsense")
    with pytest.raises(JoraError) as info:
        SafetensorsFile(tmp_path / "d.safetensors")
    assert "d.safetensors" in str(info.value)


def test_store_is_sharded_by_size_and_indexed(tmp_path, tokenizer_model):
    hf = random_hf_llama(320, 64, 2, 4, 2, 96)
    convert(write_hf_dir(hf, tmp_path / "hf", tokenizer_model), tmp_path / "store",
            ConvertSettings(dtype="fp32", max_shard_bytes=64 * 1024), progress=False)
    index = json.loads((tmp_path / "store" / "store.json").read_text())
    files = sorted((tmp_path / "store").glob("params-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert index["tokenizer"] == "tokenizer.model" and (tmp_path / "store" / "tokenizer.model").is_file()
    assert index["layout"]["rotary"] == "rotate_half"
    store = Store(tmp_path / "store")
    q = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy().T
    np.testing.assert_array_equal(store.read("layers.1.attention.q_proj"), q)


def test_each_device_reads_only_its_slice(tmp_path, tokenizer_model):
    """On 4 virtual devices, a column-sharded load asks the files for 1/4 of each tensor per device."""
    hf = random_hf_llama(320, 64, 2, 4, 2, 96)
    convert(write_hf_dir(hf, tmp_path / "hf", tokenizer_model), tmp_path / "store",
            ConvertSettings(dtype="fp32"), progress=False)
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jora_model.formats.store import Store, load_params
        from jora_model.formats.safetensors_io import SafetensorsFile
        assert len(jax.devices()) == 4
        reads = []
        original = SafetensorsFile.read
        def spy(self, name, index=None):
            out = original(self, name, index)
            reads.append((name, out.size))
            return out
        SafetensorsFile.read = spy
        mesh = Mesh(np.array(jax.devices()), ("model",))
        def sharding_for(path, shape):
            spec = [None] * len(shape)
            spec[-1] = "model"  # split the last dim of every tensor over 4 devices
            return NamedSharding(mesh, P(*spec))
        store = Store({str(tmp_path / "store")!r})
        params = load_params(store, sharding_for)
        q = params["layers/attention/q_proj"]["w"]
        assert q.shape == (2, 64, 64) and len(q.addressable_shards) == 4
        assert all(s.data.shape == (2, 64, 16) for s in q.addressable_shards)
        load_reads = list(reads)
        full = np.stack([store.read(f"layers.{{i}}.attention.q_proj") for i in range(2)])
        np.testing.assert_array_equal(np.asarray(q), full)
        q_reads = [size for name, size in load_reads if name == "layers.0.attention.q_proj"]
        assert q_reads == [64 * 64 // 4] * 4, q_reads
        print("max read elements", max(size for _, size in load_reads))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "max read elements 5120" in result.stdout  # the embedding's quarter: 320 * 64 / 4
