"""Does the fast training step train the same as the fp32 reference? (issue 7's numerical criterion)

Two runs of the real train step (`jora_model.training.step.make_step_functions`) on the same random weights of a
preset's shape, the same LoRA initialisation, the same batches and the same dropout keys:

* fast: what `jora train` runs by default: bf16 compute, bf16 frozen weights, remat `matmuls`, bf16 matmuls with
  fp32 accumulation forward and backward, the chunked output-head loss, with each kernel set asked for
  (`--kernels cpu portable`: jora_model/backends);
* reference: fp32 compute and fp32 frozen weights (the same draws before rounding to bf16), cpu kernels.

The batches are a few fixed rows of random tokens seen in turn (memorising them is what makes the loss
move over 50 steps on random weights). The criterion: every step's loss within 1e-2 relative.

    .venv/bin/python benchmarks/loss_agreement.py --preset small --steps 50 --kernels cpu portable --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._report import loadavg, write_section  # noqa: E402

SECTION = "## Training loss: the fast step against the fp32 reference"


def run(preset_name: str, steps: int, seq: int, rows: int, batches: int, lr: float, kernels: str) -> dict:
    import jax
    import numpy as np

    from jora_model.parallel import sharding
    from jora_model.training.bench import random_frozen
    from jora_model.model.config import preset
    from jora_model.model.lora import LoraSettings, init_lora_params
    from jora_model.training.step import OptimizerSettings, make_step_functions

    config = preset(preset_name)
    mesh = sharding.make_mesh(sharding.MeshShape(1, 1))
    lora = LoraSettings()
    rng = np.random.default_rng(0)
    data = []
    for _ in range(batches):
        ids = rng.integers(3, config.vocab_size, size=(1, rows, seq), dtype=np.int32)
        data.append(jax.device_put({"input_ids": ids, "loss_mask": np.ones_like(ids, bool),
                                    "segment_ids": np.ones_like(ids)}, sharding.batch_sharding(mesh)))
    curves, seconds = {}, {}
    for name, compute, dtype, ops in (("fast", "bfloat16", "bfloat16", kernels), ("fp32", "float32", "float32", "cpu")):
        fns = make_step_functions(config, lora, OptimizerSettings(lr=lr, warmup_steps=5, total_steps=steps),
                                  compute, remat="matmuls", seed=0, mesh=mesh, kernels=ops)
        frozen = random_frozen(config, mesh, dtype, step_dtype=fns.frozen_dtype)
        state = fns.init(jax.device_put(init_lora_params(config, lora, 0), fns.state_shardings.lora))
        losses, start = [], time.perf_counter()
        for step in range(steps):
            state, metrics = fns.train_step(state, frozen, data[step % batches])
            losses.append(float(metrics.loss))
        seconds[name] = time.perf_counter() - start
        curves[name] = losses
        del frozen, state
    fast, ref = np.asarray(curves["fast"]), np.asarray(curves["fp32"])
    relative = np.abs(fast - ref) / np.abs(ref)
    return {"preset": preset_name, "kernels": kernels, "steps": steps, "seq": seq, "rows": rows, "batches": batches, "lr": lr,
            "fast": curves["fast"], "fp32": curves["fp32"], "max_relative": float(relative.max()),
            "worst_step": int(relative.argmax()), "median_relative": float(np.median(relative)),
            "seconds": seconds}


def render(results: list[dict], command: str, started: str, load: tuple[str, str]) -> str:
    import jax

    lines = [SECTION, "", f"Measured {started} with", "", "```", command, "```", "",
             f"jax {jax.__version__}, CPU; load average {load[0]} at start, {load[1]} at the end. {__doc__.split(chr(10) + chr(10))[1]}"
             .replace("\n", " "), "",
             "| preset | kernels | steps | seq x rows | lr | loss, first -> last (fp32) | loss, first -> last (fast) "
             "| max relative gap (step) | median relative gap | verdict (< 1e-2) |",
             "|---|---|---:|---|---:|---|---|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['kernels']} | {r['steps']} | {r['seq']} x {r['rows']} ({r['batches']} batches in turn) | {r['lr']:g} "
            f"| {r['fp32'][0]:.4f} -> {r['fp32'][-1]:.4f} | {r['fast'][0]:.4f} -> {r['fast'][-1]:.4f} "
            f"| {r['max_relative']:.2e} ({r['worst_step']}) | {r['median_relative']:.2e} "
            f"| {'agrees' if r['max_relative'] < 1e-2 else 'DISAGREES'} |")
    lines.append("")
    lines.append("The same comparison on a tiny model runs in the test suite "
                 "(tests/test_train_precision.py, 50 steps, same criterion).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["small"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kernels", nargs="+", default=["cpu"], choices=["cpu", "portable"])
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", "benchmarks/loss_agreement.py", *map(shlex.quote, sys.argv[1:])])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = loadavg()
    results = [run(p, args.steps, args.seq, args.rows, args.batches, args.lr, k)
               for p in args.preset for k in args.kernels]
    section = render(results, command, started, (load_start, loadavg()))
    print(section)
    print(json.dumps(results), file=sys.stderr)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
