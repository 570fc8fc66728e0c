"""Llama-2-70B (64 query heads, 8 KV heads) shards on a model axis of 2, 4 and 8: every frozen tensor is
split so that no device holds more than 1/M of it, norms are replicated, and each device's slice of the
k/v projections is made of whole KV heads. On 16, wider than the KV heads, each device holds the one KV
head its 4 query heads read, and the rest splits 16 ways.

Checked with abstract shapes only: the sharding rules (jora_model/parallel/sharding.py, over the axes
the name table jora_model/formats/names.py gives) on a real mesh of M virtual CPU devices (a
subprocess: XLA reads the device count at start-up), JAX's own `devices_indices_map` for what each
device holds, and `jax.eval_shape` of a sharded identity for the placement jit would give; nothing of
70B is allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, math
    import jax, jax.numpy as jnp
    from jora_model.parallel import sharding
    from jora_model.model.config import PRESETS
    from jora_model.formats.layout import param_specs
    from jora_model.training.memory_plan import plan_memory
    from jora_model.model.lora import LoraSettings

    config = PRESETS["70B"]
    report = {"devices": len(jax.devices()), "meshes": {}}
    for m in (2, 4, 8):
        shape = sharding.MeshShape(1, m)
        sharding.check_divisible(config, shape)
        mesh = sharding.make_mesh(shape, jax.devices()[:m], config)
        tensors, abstract = {}, {}
        for spec in param_specs(config):
            s = sharding.param_sharding(mesh, spec.path, spec.shape, config)
            slices = s.devices_indices_map(spec.shape)
            held = [[(sl.start or 0, spec.shape[i] if sl.stop is None else sl.stop) for i, sl in enumerate(idx)]
                    for idx in slices.values()]
            tensors[spec.path] = {"shape": list(spec.shape), "held": held}
            abstract[spec.path] = jax.ShapeDtypeStruct(spec.shape, jnp.bfloat16, sharding=s)
        placed = jax.eval_shape(jax.jit(lambda tree: tree, out_shardings={k: v.sharding for k, v in abstract.items()}),
                                abstract)
        shard_shapes = {k: list(v.sharding.shard_shape(v.shape)) for k, v in placed.items()}
        plan = plan_memory(config, seq_len=512, batch_size=1, mesh=shape, lora=LoraSettings())
        report["meshes"][m] = {"tensors": tensors, "shard_shapes": shard_shapes,
                               "planned_frozen_bytes": plan.frozen_bytes_per_device}
    shape = sharding.MeshShape(1, 16)
    sharding.check_divisible(config, shape)
    mesh = sharding.make_mesh(shape, jax.devices()[:16], config)
    held16 = {}
    for spec in param_specs(config):
        where = sharding.param_sharding(mesh, spec.path, spec.shape, config).devices_indices_map(spec.shape)
        held16[spec.path] = [[(sl.start or 0, spec.shape[i] if sl.stop is None else sl.stop)
                              for i, sl in enumerate(where[d])] for d in mesh.devices.flat]
    plan = plan_memory(config, seq_len=512, batch_size=1, mesh=shape, lora=LoraSettings())
    report["model16"] = {"held": held16, "planned_frozen_bytes": plan.frozen_bytes_per_device}
    print(json.dumps(report))
""")


def _run() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=16")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_70b_frozen_tensors_split_over_model_2_4_8():
    report = _run()
    assert report["devices"] == 16
    head_dim, kv_width = 8192 // 64, 8 * 128
    for m_text, mesh in report["meshes"].items():
        m = int(m_text)
        per_device_elements = 0
        for path, tensor in mesh["tensors"].items():
            shape, held = tensor["shape"], tensor["held"]
            size = 1
            for n in shape:
                size *= n
            assert len(held) == m  # one slice per device of the mesh
            sizes = []
            for slices in held:
                n = 1
                for start, stop in slices:
                    n *= stop - start
                sizes.append(n)
            expected_shard = shape.copy()
            if "norm" in path:
                assert sizes == [size] * m, path  # norms: every device holds all of it
            else:
                assert all(n * m == size for n in sizes), (path, m, sizes)  # exactly 1/M each, nothing more
                assert len({tuple(map(tuple, s)) for s in held}) == m, path  # M different slices
                split = [i for i, (start, stop) in enumerate(held[0]) if stop - start != shape[i]]
                assert len(split) == 1, path
                expected_shard[split[0]] //= m
                if path.endswith(("k_proj/w", "v_proj/w")):
                    assert shape[-1] == kv_width and split == [2]
                    for slices in held:  # whole KV heads: 8 / M heads of 128 features each
                        start, stop = slices[2]
                        assert start % head_dim == 0 and (stop - start) == (8 // m) * head_dim
            assert mesh["shard_shapes"][path] == expected_shard, path  # what jit places agrees
            per_device_elements += sizes[0]
        assert mesh["planned_frozen_bytes"] == per_device_elements * 2  # jora plan counts the same
    # model=16: device i holds query heads 4i .. 4i+3 and KV head i // 2, which those heads read
    held, per_device_elements = report["model16"]["held"], 0
    for path, slices in held.items():
        columns = [s[-1] for s in slices]
        if path.endswith(("q_proj/w", "k_proj/w", "v_proj/w")):
            width = 4 * head_dim if "q_proj" in path else head_dim
            heads = range(16) if "q_proj" in path else [i // 2 for i in range(16)]
            assert columns == [[h * width, (h + 1) * width] for h in heads], path
        n = 1
        for start, stop in slices[0]:
            n *= stop - start
        per_device_elements += n
    assert report["model16"]["planned_frozen_bytes"] == per_device_elements * 2
