"""Our train step and PEFT's, alternating step by step in one process: a paired speed comparison.

On a shared VM the speed of both sides drifts by 20-45% from minute to minute, so separate runs of
each (benchmarks/peft_compare.py, which also measures peak memory) need many rounds before their
medians settle. Here one process builds both, `jora bench`'s step (jora_model.training.bench.PreparedStep)
and PEFT's (peft_compare.peft_step: the same model, LoRA, optimizer and batch), and times them in
turns (A B, then B A, ...), with a pause between steps so that neither side's idle threads are
still spinning when the other starts. Each pair of neighbouring steps saw the same machine, so the
ratio of their times is a steadier figure than either time: its median (and quartiles) over many
pairs is what this reports. Memory is not measured here (two models in one process); peak RSS
comes from peft_compare.py's separate runs.

    .venv/bin/python benchmarks/paired_peft.py --presets small base110m --pairs 40 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _report import loadavg, write_section  # noqa: E402  (benchmarks/ is on sys.path)
from peft_compare import child_environment, huge_pages_text, machine_facts  # noqa: E402  (no torch or JAX)
from pipeline.launch import tunes_huge_pages

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Training speed vs PEFT, paired in one process"


def paired_child(spec: dict) -> None:
    """Build both steps for one preset, alternate them, print one JSON line."""
    sys.path.insert(0, str(REPO))
    from peft_compare import peft_step  # imports torch when called, in this child only
    from jora_model.training.bench import BenchSettings, PreparedStep
    from jora_model.model.config import preset

    ours = PreparedStep(BenchSettings(preset=spec["preset"], seq=spec["seq"], batch=spec["batch"],
                                      steps=spec["pairs"], warmup=spec["warmup"]))
    peft_spec = {"shape": preset(spec["preset"]).to_dict(), "dtype": "bf16", "seq": spec["seq"],
                 "batch": spec["batch"], "attn": "sdpa", "threads": spec["threads"], "device": "cpu"}
    theirs, _, _ = peft_step(peft_spec)
    sides = {"ours": ours.run, "peft": theirs}
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    losses: dict[str, float] = {}
    for i in range(spec["warmup"] + spec["pairs"]):
        for name in (("ours", "peft") if i % 2 == 0 else ("peft", "ours")):
            time.sleep(spec["pause"])
            start = time.perf_counter()
            losses[name] = sides[name]()
            if i >= spec["warmup"]:
                times[name].append(time.perf_counter() - start)
    print(json.dumps({"preset": spec["preset"], "times": times, "losses": losses}))


def summarise(result: dict, tokens: int) -> dict:
    ours, peft = result["times"]["ours"], result["times"]["peft"]
    speedup = [p / o for o, p in zip(ours, peft)]  # > 1: ours faster, pair by pair
    q25, _, q75 = statistics.quantiles(speedup, n=4)
    return {
        "preset": result["preset"], "pairs": len(ours),
        "ours_median_s": statistics.median(ours), "peft_median_s": statistics.median(peft),
        "ours_tokens_per_s": tokens / statistics.median(ours), "peft_tokens_per_s": tokens / statistics.median(peft),
        "speedup_median": statistics.median(speedup), "speedup_q25": q25, "speedup_q75": q75,
        "ratio_of_medians": statistics.median(peft) / statistics.median(ours),
        "ours_min_s": min(ours), "peft_min_s": min(peft),
        "final_loss": result["losses"],
    }


def render(command: str, meta: dict, rows: list[dict]) -> str:
    f = meta["facts"]
    lines = [SECTION, "", f"Measured {meta['when']} with", "", "```", command, "```", "",
             f"Machine: {f['nproc']} CPUs ({f['cpu']}), {f['ram_gib']:.1f} GiB RAM, Linux {f['kernel']}, Python "
             f"{f['python']}, jax {f['jax']}, torch {f['torch']}, transformers {f['transformers']}, peft {f['peft']}. "
             f"Load average {meta['load_start']} at start, {meta['load_end']} at the end. One process per preset "
             f"builds our step (`jora bench`'s defaults: bf16 compute, bf16 frozen weights, remat matmuls) and "
             f"PEFT bf16's (the model, LoRA r16 on q_proj/v_proj, AdamW and batch of \"Training speed and memory vs "
             f"PEFT\"), runs {meta['warmup']} warm-up pairs, then {meta['pairs']} timed pairs in alternating order "
             f"with {meta['pause']} s between steps. Speedup = PEFT's step time / ours, pair by pair (>1: ours "
             "faster); its median and quartiles are the figures to read. No memory here: peak RSS comes from the "
             "separate runs above. " + huge_pages_text(meta.get("huge_pages", False)), "",
             "| preset | pairs | ours s (median) | PEFT s (median) | ours tokens/s | PEFT tokens/s "
             "| speedup, median of pairs | quartiles | ratio of medians | fastest step, ours / PEFT |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['pairs']} | {r['ours_median_s']:.3f} | {r['peft_median_s']:.3f} | "
                     f"{r['ours_tokens_per_s']:.0f} | {r['peft_tokens_per_s']:.0f} | **{r['speedup_median']:.2f}x** | "
                     f"{r['speedup_q25']:.2f}-{r['speedup_q75']:.2f} | {r['ratio_of_medians']:.2f}x | "
                     f"{r['ours_min_s']:.3f} / {r['peft_min_s']:.3f} |")
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        paired_child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "base110m"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=40, help="timed pairs per preset")
    parser.add_argument("--warmup", type=int, default=3, help="untimed pairs (compilation, allocator warm-up)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of sleep before every step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for PEFT")
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                        help="run the process with glibc.malloc.hugetlb=1, as `jora` runs itself (default)")
    parser.add_argument("--note", default="", help="a paragraph appended to the section")
    parser.add_argument("--write", action="store_true", help="replace this script's section of RESULTS.md")
    args = parser.parse_args()
    child_env = child_environment(args.huge_pages)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": loadavg(),
            "facts": machine_facts(),
            "pairs": args.pairs, "warmup": args.warmup, "pause": args.pause, "note": args.note,
            "huge_pages": tunes_huge_pages(child_env)}
    rows = []
    for name in args.presets:
        spec = {"preset": name, "seq": args.seq, "batch": args.batch, "pairs": args.pairs, "warmup": args.warmup,
                "pause": args.pause, "threads": args.threads}
        done = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], capture_output=True, text=True,
                              env=child_env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            sys.exit(f"error: the paired run for {name} failed: {done.stderr.strip().splitlines()[-1:]}")
        rows.append(summarise(json.loads(lines[-1]), args.seq * args.batch))
        print(json.dumps(rows[-1]), flush=True)
    meta["load_end"] = loadavg()
    argv, skip = [], False
    for a in sys.argv[1:]:  # the command that made the figures: without --write and the note's text
        if skip or a == "--write" or a.startswith("--note="):
            skip = False
        elif a == "--note":
            skip = True
        else:
            argv.append(a)
    command = " ".join([".venv/bin/python benchmarks/paired_peft.py", *argv])
    section = render(command, meta, rows)
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
