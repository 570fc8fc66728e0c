"""Training on a device mesh gives the losses of one device, with each device holding its share.

Each run is a subprocess with its own virtual CPU device count (XLA reads the flag at start-up).
fp32 compute; tolerance 1e-4 relative over 5 steps: sharded matmuls sum in a different order, which
moves fp32 results by ~1e-6 relative; any sharding mistake (a wrong head split, a missing all-reduce)
moves the loss by far more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.train_helpers import tiny_data, tiny_store

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    from jora_model.model.lora import LoraSettings
    from jora_model.training.trainer import TrainSettings, run_training
    from jora_model.parallel import sharding
    from jora_model.formats.store import Store, load_params

    store, data, work, mesh = sys.argv[1:5]
    settings = TrainSettings(lora=LoraSettings(r=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "down_proj")),
                             lr=1e-3, batch_size=2, grad_accum=2, max_seq_len=256, max_steps=5, eval_every=5,
                             checkpoint_every=5, mesh=mesh, compute_dtype="float32", remat="none")
    result = run_training(Path(store), Path(data), Path(work), settings, progress=False)
    losses = [r["loss"] for r in map(json.loads, (Path(work) / "metrics.jsonl").read_text().splitlines())]
    shape = sharding.MeshShape.parse(mesh) if mesh else sharding.MeshShape(1, len(jax.devices()))
    m = sharding.make_mesh(shape)
    s = Store(store)
    params = load_params(s, lambda path, shp: sharding.param_sharding(m, path, shp, s.config))
    fractions = {}
    for module, leaves in params.items():
        for name, array in leaves.items():
            fractions[f"{module}/{name}"] = sorted({x.data.size / array.size for x in array.addressable_shards})
    print(json.dumps({"losses": losses, "eval": result.eval_loss, "devices": len(jax.devices()),
                      "fractions": fractions}))
""")


def _run(store, data, work, mesh, devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(store), str(data), str(work), mesh],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("mesh")
    _, store = tiny_store(root, tokenizer_model, n_heads=8, n_kv_heads=4)
    data = tiny_data(root, tokenizer_model, n=20)
    return root, store, data, _run(store, data, root / "one", "", 1)


@pytest.mark.parametrize("mesh,share", [("data=2,model=2", 0.5), ("model=4", 0.25)])
def test_mesh_matches_one_device(single, mesh, share):
    root, store, data, reference = single
    result = _run(store, data, root / mesh.replace(",", "_").replace("=", ""), mesh, 4)
    assert result["devices"] == 4 and len(result["losses"]) == 5
    for ours, ref in zip(result["losses"], reference["losses"]):
        assert abs(ours - ref) <= 1e-4 * abs(ref), (result["losses"], reference["losses"])
    assert abs(result["eval"] - reference["eval"]) <= 1e-4 * abs(reference["eval"])
    sharded = {k: v for k, v in result["fractions"].items() if "norm" not in k}
    assert sharded and all(v == [share] for v in sharded.values()), sharded  # heads, MLP and vocab split
    assert all(v == [1.0] for k, v in result["fractions"].items() if "norm" in k)  # norms replicated
