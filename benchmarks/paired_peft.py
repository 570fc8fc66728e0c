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

--memory-rounds N adds peak RSS: after each preset's pairs, N rounds of one process per side (ours alone,
PEFT alone, alternating which goes first), each building its side as the paired child does and running
a few steps; their ru_maxrss. Any preset `jora bench` knows works, e.g. Llama 3's 128k head on a small body:

    .venv/bin/python benchmarks/paired_peft.py --presets small small128k --pairs 30 --memory-rounds 2 \
        --section "## Llama 3: train step at small128k vs PEFT" --write
"""

from __future__ import annotations

import argparse
import json
import shlex
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


def memory_child(spec: dict) -> None:
    """Peak RSS of one side alone (ours or PEFT's), built and run as in the paired child: this process's
    ru_maxrss after warm-up + steps, and its RSS after the imports (before the model), as one JSON line."""
    import resource

    def rss_mib(field: str = "VmRSS") -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    sys.path.insert(0, str(REPO))
    from jora_model.model.config import preset

    if spec["side"] == "ours":
        from jora_model.training.bench import BenchSettings, PreparedStep

        import jax  # noqa: F401  (the imports' RSS, before the model)
        imports = rss_mib()
        step = PreparedStep(BenchSettings(preset=spec["preset"], seq=spec["seq"], batch=spec["batch"],
                                          steps=spec["steps"], warmup=spec["warmup"])).run
    else:
        from peft_compare import peft_step

        import peft, torch, transformers  # noqa: F401,E401
        imports = rss_mib()
        step, _, _ = peft_step({"shape": preset(spec["preset"]).to_dict(), "dtype": "bf16", "seq": spec["seq"],
                                "batch": spec["batch"], "attn": "sdpa", "threads": spec["threads"], "device": "cpu"})
    built, built_peak = rss_mib(), rss_mib("VmHWM")  # the model, adapter and batch in place; the peak so far
    for _ in range(spec["warmup"]):
        step()
    warm_peak = rss_mib("VmHWM")
    try:  # reset VmHWM (proc(5): clear_refs "5"), so that what follows is the steady steps' own peak
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(spec["steps"]):
        step()
    print(json.dumps({"side": spec["side"], "preset": spec["preset"], "imports_rss_mib": imports,
                      "built_rss_mib": built, "built_peak_rss_mib": built_peak, "warm_peak_rss_mib": warm_peak,
                      "steps_peak_rss_mib": rss_mib("VmHWM") if reset else None, "end_rss_mib": rss_mib(),
                      # clear_refs resets ru_maxrss too: the whole run's peak is the larger of the two parts
                      "peak_rss_mib": max(warm_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


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


def render(command: str, meta: dict, rows: list[dict], title: str = SECTION) -> str:
    f = meta["facts"]
    lines = [title, "", f"Measured {meta['when']} with", "", "```", command, "```", "",
             f"Machine: {f['nproc']} CPUs ({f['cpu']}), {f['ram_gib']:.1f} GiB RAM, Linux {f['kernel']}, Python "
             f"{f['python']}, jax {f['jax']}, torch {f['torch']}, transformers {f['transformers']}, peft {f['peft']}. "
             f"Load average {meta['load_start']} at start, {meta['load_end']} at the end. One process per preset "
             f"builds our step (`jora bench`'s defaults: bf16 compute, bf16 frozen weights, remat matmuls) and "
             f"PEFT bf16's (the model, LoRA r16 on q_proj/v_proj, AdamW and batch of \"Training speed and memory vs "
             f"PEFT\"), runs {meta['warmup']} warm-up pairs, then {meta['pairs']} timed pairs in alternating order "
             f"with {meta['pause']} s between steps. Speedup = PEFT's step time / ours, pair by pair (>1: ours "
             "faster); its median and quartiles are the figures to read. " + (
                 "No memory here: peak RSS comes from the separate runs above. " if not meta.get("memory_rounds") else
                 f"Peak RSS: after each preset's pairs, {meta['memory_rounds']} rounds of two more processes, ours "
                 f"alone and PEFT alone (alternating which goes first), each building its side as above and running "
                 f"1 + {meta['memory_steps']} steps; peak RSS of the whole process (VmHWM / ru_maxrss), median of "
                 "the rounds (libraries included; RSS after the imports, before the model, in brackets). ") + huge_pages_text(meta.get("huge_pages", False)), "",
             "| preset | pairs | ours s (median) | PEFT s (median) | ours tokens/s | PEFT tokens/s "
             "| speedup, median of pairs | quartiles | ratio of medians | fastest step, ours / PEFT |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if not r["pairs"]:  # --pairs 0: memory only
            continue
        lines.append(f"| {r['preset']} | {r['pairs']} | {r['ours_median_s']:.3f} | {r['peft_median_s']:.3f} | "
                     f"{r['ours_tokens_per_s']:.0f} | {r['peft_tokens_per_s']:.0f} | **{r['speedup_median']:.2f}x** | "
                     f"{r['speedup_q25']:.2f}-{r['speedup_q75']:.2f} | {r['ratio_of_medians']:.2f}x | "
                     f"{r['ours_min_s']:.3f} / {r['peft_min_s']:.3f} |")
    if any("ours_peak_rss_mib" in r for r in rows):
        lines += ["", "| preset | ours peak RSS, MiB (after imports) | PEFT peak RSS, MiB (after imports) | ours / PEFT "
                      "| rounds: ours; PEFT |", "|---|---:|---:|---:|---|"]
        for r in rows:
            if "ours_peak_rss_mib" in r:
                lines.append(f"| {r['preset']} | {r['ours_peak_rss_mib']:.0f} ({r['ours_imports_rss_mib']:.0f}) | "
                             f"{r['peft_peak_rss_mib']:.0f} ({r['peft_imports_rss_mib']:.0f}) | "
                             f"{r['ours_peak_rss_mib'] / r['peft_peak_rss_mib']:.2f}x | "
                             f"{', '.join(map(str, r['ours_peak_rss_all']))}; {', '.join(map(str, r['peft_peak_rss_all']))} |")
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        paired_child(json.loads(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "_memory":
        memory_child(json.loads(sys.argv[2]))
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
    parser.add_argument("--memory-rounds", type=int, default=0,
                        help="after each preset's paired run, this many rounds of two more children (ours alone, "
                             "PEFT alone, alternating which goes first) for peak RSS (ru_maxrss); medians reported")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps after 1 warm-up in each memory child")
    parser.add_argument("--section", default=SECTION, help="the RESULTS.md section (heading) --write replaces")
    parser.add_argument("--save", type=Path, help="also write the figures (command, meta, rows) to this JSON file")
    parser.add_argument("--render-only", type=Path, metavar="SAVED",
                        help="measure nothing: render (and with --write, write) the section from a --save file, "
                             "with this run's --note and --section")
    parser.add_argument("--note", default="", help="a paragraph appended to the section")
    parser.add_argument("--write", action="store_true", help="replace this script's section of RESULTS.md")
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads(args.render_only.read_text())
        section = render(saved["command"], {**saved["meta"], "note": args.note or saved["meta"].get("note", "")},
                         saved["rows"], args.section)
        print(section)
        if args.write:
            write_section(args.section, section)
        return
    child_env = child_environment(args.huge_pages)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": loadavg(),
            "facts": machine_facts(),
            "pairs": args.pairs, "warmup": args.warmup, "pause": args.pause, "note": args.note,
            "memory_rounds": args.memory_rounds, "memory_steps": args.memory_steps,
            "huge_pages": tunes_huge_pages(child_env)}
    rows = []
    for name in args.presets:
        spec = {"preset": name, "seq": args.seq, "batch": args.batch, "pairs": args.pairs, "warmup": args.warmup,
                "pause": args.pause, "threads": args.threads}
        if args.pairs:
            done = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], capture_output=True,
                                  text=True, env=child_env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if args.pairs and (done.returncode != 0 or not lines):
            sys.exit(f"error: the paired run for {name} failed: {done.stderr.strip().splitlines()[-1:]}")
        if args.pairs:
            rows.append(summarise(json.loads(lines[-1]), args.seq * args.batch))
        else:  # --pairs 0: memory only
            rows.append({"preset": name, "pairs": 0})
        rows[-1]["load_after_pairs"] = loadavg()
        memory: dict[str, list[dict]] = {"ours": [], "peft": []}
        for k in range(args.memory_rounds):
            for side in (("ours", "peft") if k % 2 == 0 else ("peft", "ours")):
                mspec = {**spec, "side": side, "steps": args.memory_steps, "warmup": 1}
                done = subprocess.run([sys.executable, __file__, "_memory", json.dumps(mspec)], capture_output=True,
                                      text=True, env=child_env)
                mlines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode != 0 or not mlines:
                    sys.exit(f"error: the memory run ({side}, {name}) failed: {done.stderr.strip().splitlines()[-1:]}")
                memory[side].append(json.loads(mlines[-1]))
        if args.memory_rounds:
            for side, ms in memory.items():
                rows[-1][f"{side}_peak_rss_mib"] = statistics.median(m["peak_rss_mib"] for m in ms)
                rows[-1][f"{side}_imports_rss_mib"] = statistics.median(m["imports_rss_mib"] for m in ms)
                rows[-1][f"{side}_peak_rss_all"] = [round(m["peak_rss_mib"], 1) for m in ms]
                rows[-1][f"{side}_memory_children"] = ms
        print(json.dumps(rows[-1]), flush=True)
    meta["load_end"] = loadavg()
    argv, skip = [], False
    for a in sys.argv[1:]:  # the command that made the figures: without --write and the note's text
        if skip or a == "--write" or a.startswith(("--note=", "--save=")):
            skip = False
        elif a in ("--note", "--save"):
            skip = True
        else:
            argv.append(a)
    command = " ".join([".venv/bin/python benchmarks/paired_peft.py", *map(shlex.quote, argv)])
    if args.save:
        args.save.write_text(json.dumps({"command": command, "meta": meta, "rows": rows}, indent=1))
    section = render(command, meta, rows, args.section)
    print(section)
    if args.write:
        write_section(args.section, section)


if __name__ == "__main__":
    main()
