"""Is the compiled train step the same program in two checkouts? Prints a hash of its optimised HLO.

Compiles the real train step (bf16 compute and weights, remat matmuls, LoRA r16 on q_proj and v_proj,
one row of `--seq` tokens) for a preset's shape, as `jora bench` does, and hashes XLA's optimised HLO
with what does not change the program removed: source locations, stack frames and the numeric suffixes
of instruction names. Equal hashes mean XLA runs the same program: same speed, same memory, same
results. Reads the checkout given by --repo (either layout: the flat jora_model/ of before the
sub-packages, or today's), so a refactoring can be checked against the commit before it:

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/step_hlo.py --repo /tmp/before --preset small base110m
    .venv/bin/python benchmarks/step_hlo.py --preset small base110m
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import sys
from pathlib import Path


def _modules(repo: Path):
    sys.path.insert(0, str(repo))
    if (repo / "jora_model" / "training").is_dir():
        names = ("jora_model.model.config", "jora_model.model.lora", "jora_model.parallel.sharding",
                 "jora_model.training.step")
    else:
        names = ("jora_model.config", "jora_model.lora", "jora_model.sharding", "jora_model.train")
    return [importlib.import_module(name) for name in names]


def normalised_hlo(text: str) -> str:
    body = text[text.index("\n%"):]  # the computations, without the file and stack-frame tables
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    body = re.sub(r",? ?stack_frame_id=\d+", "", body)
    return re.sub(r"\.\d+\b", "", body)


def step_hlo(modules, preset: str, seq: int, kernels: str | None) -> str:
    config_mod, lora_mod, sharding, step = modules
    config = config_mod.preset(preset)
    mesh = sharding.make_mesh(sharding.MeshShape(1, 1))
    extra = {"kernels": kernels} if kernels else {}
    fns = step.make_step_functions(config, lora_mod.LoraSettings(), step.OptimizerSettings(total_steps=10),
                                   "bfloat16", "matmuls", mesh=mesh, **extra)
    args = step.abstract_arguments(config, fns, mesh, (1, 1, seq), "bfloat16")
    return normalised_hlo(fns.train_step.compiled(*args).as_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--preset", nargs="+", default=["small"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--kernels", default=None, help="cpu or portable (a checkout without kernel sets: leave out)")
    args = parser.parse_args()
    modules = _modules(args.repo.resolve())
    for preset in args.preset:
        text = step_hlo(modules, preset, args.seq, args.kernels)
        print(f"{preset} seq {args.seq}: {len(text.splitlines())} HLO lines, "
              f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
