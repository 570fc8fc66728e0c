"""Training speed and memory of `jora bench` against Hugging Face PEFT doing the same work.

The same LoRA step on random weights of the same Llama shape, one configuration per child process:

* ours: `jora bench --preset P --seq T --batch B ...` (LoRA r16 alpha16 dropout 0.05 on q,v; AdamW,
  global-norm clip 1.0; fp32 master adapter), in each setting given by --ours (a small search: the
  fastest is "our best setting", and every one tried is reported);
* PEFT: transformers.LlamaForCausalLM(config) of the same shape, random init, no tied embeddings,
  attention through --attn (default "sdpa", transformers' normal fast path),
  peft.get_peft_model(LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
  target_modules=["q_proj", "v_proj"])), torch.optim.AdamW (weight decay 0, like ours) on the trainable
  parameters, and per step: forward with labels, loss.backward(), clip_grad_norm_(1.0), step(),
  zero_grad(). --threads torch threads (2). Dtypes (--peft):
    fp32      the model built in float32;
    bf16      the model built directly in bfloat16 (what model.to(torch.bfloat16) or
              from_pretrained(dtype=torch.bfloat16) gives, without a transient fp32 copy in the peak);
              PEFT keeps the adapter itself in fp32 (get_peft_model's autocast_adapter_dtype=True);
    autocast  the fp32 model, forward under torch.autocast(bfloat16) (mixed precision, as Trainer's
              bf16=True does).
  The token batch is the one `jora bench` draws (numpy default_rng(0)), labels = input ids.

Configurations alternate round-robin within each round (A, B, C, A, B, C, ...; the starting one
rotates by round). Before each round the harness may wait (--load-wait s) for the 1-minute load average
to drop below --max-load. Before each run it waits (--idle-wait s) until the whole machine's CPU use over
5 s is below --idle-cores. On a shared 2-core VM this matters most: with another job on one core,
torch's two OpenMP threads stall and PEFT steps get 2-10x slower, while ours get 2-3x slower. Every run
records the other processes' CPU use during it (/proc/stat busy time less the child's own) and the load
averages around it. Per configuration the harness reports: the median over rounds of the child's median
step time; tokens/s from that; the fastest single step; and peak RSS, the child's ru_maxrss from os.wait4.
This parent imports nothing heavy (no torch, jax or numpy), because Linux folds the launching image's
peak RSS into a child's ru_maxrss when it is higher; its own peak is printed to show it is small.

    .venv/bin/python benchmarks/peft_compare.py --presets small base110m --rounds 3 \
        --peft bf16 fp32 autocast --load-wait 0 --write
    .venv/bin/python benchmarks/peft_compare.py --render /tmp/jora-peft-compare --note "..." --write

--render re-renders the section from a finished run's folder, keeping that run's command, and adds
--note. On a GPU (see benchmarks/gpu.sh): --device cuda --presets 7B --peft bf16 --rounds 1
--load-wait 0 --idle-wait 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from _report import RESULTS, loadavg, write_section  # noqa: E402  (benchmarks/ is on sys.path)

from jora_model.model.remat import POLICIES  # names only: imports no JAX
from pipeline.launch import TUNABLE_NAME, huge_page_environment, tunes_huge_pages  # imports no JAX

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Training speed and memory vs PEFT"
MIB = 1024 ** 2

# LoRA and optimizer settings shared by both sides (jora's defaults; `jora bench` uses alpha = r).
LORA_R, LORA_ALPHA, LORA_DROPOUT, TARGETS = 16, 16, 0.05, ("q_proj", "v_proj")
DEFAULT_OURS = ["bf16,bf16,matmuls", "bf16,bf16,layer"]
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------

def shape_child(preset: str) -> None:
    """Print the preset's LlamaConfig as JSON (run in its own process: importing jora may import jax)."""
    sys.path.insert(0, str(REPO))
    from jora_model.model.config import preset as lookup

    print(json.dumps(lookup(preset).to_dict()))


def peft_step(spec: dict):
    """PEFT's model and one training step for `spec` (shape, dtype, seq, batch, attn, threads, device):
    (step, model, trainable); step() runs forward, backward, clip, AdamW and returns the loss.
    Shared with benchmarks/paired_peft.py, which runs it beside ours in one process."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(spec["device"])
    mode = spec["dtype"]
    build_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    s = spec["shape"]
    config = LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["dim"], intermediate_size=s["ffn_dim"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
        rms_norm_eps=s["norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
        max_position_embeddings=s["max_seq_len"], tie_word_embeddings=False, use_cache=False,
        attn_implementation=spec["attn"])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(build_dtype)
    try:
        with device:  # parameters are created on the device, in build_dtype
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                             target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    ids = np.random.default_rng(0).integers(0, s["vocab_size"], (1, spec["batch"], spec["seq"]), dtype=np.int32)[0]
    input_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    cuda = device.type == "cuda"

    def step() -> float:
        if mode == "autocast":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=input_ids, labels=input_ids).loss
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss)
        if cuda:
            torch.cuda.synchronize()
        return value

    return step, model, trainable


def peft_child(spec: dict) -> None:
    """One PEFT measurement; prints one JSON line."""
    import peft
    import torch
    import transformers

    started = time.perf_counter()
    step, model, trainable = peft_step(spec)
    build_s = time.perf_counter() - started
    device = torch.device(spec["device"])
    mode = spec["dtype"]
    cuda = device.type == "cuda"

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, loss = [], [], float("nan")
    for i in range(spec["warmup"] + spec["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    step_s = statistics.median(times)
    tokens = spec["seq"] * spec["batch"]
    out = {
        "side": "peft", "dtype": mode, "attn": model.config._attn_implementation, "device": str(device),
        "threads": torch.get_num_threads(), "preset": spec["preset"], "seq": spec["seq"], "batch": spec["batch"],
        "median_step_s": step_s, "min_step_s": min(times), "step_times_s": times, "tokens_per_s": tokens / step_s,
        "median_step_cpu_s": statistics.median(cpu_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "build_s": build_s,
        "trainable_params": sum(p.numel() for p in trainable),
        "frozen_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype),
        "adapter_dtype": str(trainable[0].dtype), "final_loss": loss,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if cuda:
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["device_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["device_name"] = torch.cuda.get_device_name()
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# Harness (standard library only)
# ---------------------------------------------------------------------------------------------


def load1() -> float:
    return float(loadavg().split()[0])


def wait_for_quiet(max_load: float, timeout: float) -> dict:
    start, before = time.monotonic(), loadavg()
    while timeout > 0 and load1() >= max_load and time.monotonic() - start < timeout:
        time.sleep(5)
    return {"load_at_wait": before, "waited_s": round(time.monotonic() - start, 1), "load_start": loadavg()}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat: busy = user, nice,
    system, irq, softirq (guest time is inside user); steal = time the hypervisor gave to others."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


def wait_for_idle(max_cores: float, timeout: float, window: float = 5.0) -> dict:
    """Wait (at most timeout s) until the machine's busy CPU over a window is below max_cores."""
    start = time.monotonic()
    busy = float("nan")
    while timeout > 0:
        b0, _ = cpu_seconds()
        time.sleep(window)
        busy = (cpu_seconds()[0] - b0) / window
        if busy < max_cores or time.monotonic() - start >= timeout:
            break
    return {"idle_wait_s": round(time.monotonic() - start, 1), "busy_cores_before": round(busy, 2)}


def jora_command() -> list[str]:
    """The jora next to this interpreter if installed, else this checkout's CLI module."""
    candidate = Path(sys.executable).parent / "jora"
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", "pipeline.cli"]


def child_environment(huge_pages: bool) -> dict[str, str]:
    """The environment of every child, ours and PEFT's alike: with glibc's huge-page tunable, which
    `jora` sets for itself (pipeline/launch.py), or without it and with jora's re-execution off. So both
    sides always run under one allocator setting; the section records which."""
    env = dict(os.environ)
    if huge_pages:
        return huge_page_environment(env) or env
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=")[0] != TUNABLE_NAME]
    env.pop("GLIBC_TUNABLES", None)
    return {**env, "JORA_HUGE_PAGES": "0", **({"GLIBC_TUNABLES": ":".join(kept)} if kept else {})}


def huge_pages_text(on: bool) -> str:
    return ("Both sides ran with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for "
            "glibc's large allocations), as `jora` runs itself (pipeline/launch.py)." if on else
            "Both sides ran without glibc's huge-page tunable (`--no-huge-pages`).")


def run_child(argv: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run argv; its last stdout line as JSON, plus ru_maxrss (wait4), CPU seconds and wall seconds."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    out_path = log.with_suffix(".out")
    busy0, steal0 = cpu_seconds()
    with open(log, "wb") as err, open(out_path, "wb") as stdout_file:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=stdout_file, stderr=err, cwd=REPO, env=env)
        deadline = started + timeout
        while True:  # poll with WNOHANG so that a hung child can be killed
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        wall = time.monotonic() - started
        busy1, steal1 = cpu_seconds()
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text(errors="replace")
    code = proc.returncode
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(argv)} exited with {code} after {wall:.0f} s; see {log}:\n{tail}")
    result = json.loads(lines[-1])
    cpu = usage.ru_utime + usage.ru_stime
    # Other processes' CPU during the run, in cores (the machine's busy time less the child's own).
    result.update(maxrss_mib=usage.ru_maxrss / 1024, cpu_s=cpu, wall_s=wall,
                  others_cores=max(busy1 - busy0 - cpu, 0.0) / wall, steal_cores=(steal1 - steal0) / wall)
    return result


def parse_ours(text: str) -> dict:
    compute, param, remat = (part.strip() for part in text.split(","))
    if compute not in DTYPE_NAMES or param not in DTYPE_NAMES or remat not in POLICIES:
        raise argparse.ArgumentTypeError(f"--ours {text!r}: expected COMPUTE,PARAM,{'|'.join(POLICIES)} with bf16/fp32")
    return {"compute": compute, "param": param, "remat": remat, "text": f"{compute},{param},{remat}"}


def config_label(c: dict) -> str:
    if c["side"] == "ours":
        return f"ours {c['text']}"
    return f"PEFT {c['dtype']}"


def build_argv(c: dict, args, shape: dict) -> list[str]:
    if c["side"] == "ours":
        return [*jora_command(), "bench", "--preset", c["preset"], "--seq", str(args.seq), "--batch", str(args.batch),
                "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--compute-dtype", DTYPE_NAMES[c["compute"]], "--param-dtype", DTYPE_NAMES[c["param"]],
                "--remat", c["remat"], "--lora-r", str(LORA_R), "--targets", ",".join(TARGETS)]
    spec = {"preset": c["preset"], "shape": shape, "dtype": c["dtype"], "seq": args.seq, "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "attn": args.attn,
            "device": args.device}
    return [sys.executable, __file__, "_peft", json.dumps(spec)]


def machine_facts() -> dict:
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    versions = {}
    for package in ("jax", "jaxlib", "torch", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {"nproc": len(os.sched_getaffinity(0)), "ram_gib": int(mem.group(1)) / 1024 ** 2 if mem else None,
            "cpu": cpu.group(1).strip() if cpu else platform.processor(), "kernel": platform.release(),
            "python": platform.python_version(), **versions}


def summarise(results: list[dict], configs: list[dict]) -> list[dict]:
    rows = []
    for c in configs:
        runs = [r for r in results if r["key"] == c["key"]]
        if not runs:
            continue
        row = {**c, "runs": len(runs), "step_s": statistics.median(r["median_step_s"] for r in runs),
               "step_s_runs": [r["median_step_s"] for r in runs],
               "rss_mib": statistics.median(r["maxrss_mib"] for r in runs),
               "cpu_per_wall": statistics.median(r["cpu_s"] / r["wall_s"] for r in runs),
               "fastest_step_s": min(min(r.get("step_times_s") or [r["min_step_s"]]) for r in runs),
               "others_cores": statistics.median(r.get("others_cores", float("nan")) for r in runs),
               "others_cores_max": max(r.get("others_cores", float("nan")) for r in runs),
               "loss": runs[-1].get("final_loss")}
        row["tokens_per_s"] = row["seq_tokens"] / row["step_s"]
        device_peaks = [r["device_peak_bytes"] for r in runs if "device_peak_bytes" in r]
        if device_peaks:
            row["device_peak_mib"] = statistics.median(device_peaks) / MIB
        flops = [r["model_flops_per_s"] * r["median_step_s"] for r in runs if "model_flops_per_s" in r]
        if flops:
            row["flops_per_step"] = flops[0]
        peaks = [r["matmul_peak_flops_per_s"] for r in runs if "matmul_peak_flops_per_s" in r]
        if peaks:
            row["matmul_peak"] = statistics.median(peaks)
        rows.append(row)
    for preset in dict.fromkeys(r["preset"] for r in rows):
        ours = [r for r in rows if r["preset"] == preset and r["side"] == "ours"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["step_s"])
        best["best"] = True
        for r in rows:
            if r["preset"] == preset:
                r["speed_ratio"] = r["step_s"] / best["step_s"]  # >1: ours (best) is that much faster
                r["fastest_ratio"] = r["fastest_step_s"] / best["fastest_step_s"]
                r["rss_ratio"] = best["rss_mib"] / r["rss_mib"]  # ours' peak RSS / this one's
                if "device_peak_mib" in r and "device_peak_mib" in best:
                    r["device_ratio"] = best["device_peak_mib"] / r["device_peak_mib"]
                if "flops_per_step" in best:  # the same model FLOPs per step for every row of a preset
                    r["model_flops_per_s"] = best["flops_per_step"] / r["step_s"]
    return rows


def render_table(rows: list[dict]) -> list[str]:
    device = any("device_peak_mib" in r for r in rows)
    cols = ["preset", "configuration", "step s (median)", "step s per round", "fastest step s", "tokens/s",
            "model GFLOP/s", "peak RSS MiB"] + (["device peak MiB"] if device else []) + [
            "others' CPU, cores (median / max)", "CPU s / wall s", "ours (best) tokens/s ÷ this",
            "same on fastest steps", "ours (best) peak RSS ÷ this"] + (
            ["ours (best) device peak ÷ this"] if device else [])
    align = ["---", "---", "---:", "---", "---:", "---:", "---:", "---:"] + (["---:"] if device else []) + [
        "---:", "---:", "---:", "---:", "---:"] + (["---:"] if device else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    nan = float("nan")
    for r in rows:
        cells = [r["preset"], config_label(r) + (" **(best)**" if r.get("best") else ""), f"{r['step_s']:.3f}",
                 ", ".join(f"{t:.3f}" for t in r["step_s_runs"]), f"{r['fastest_step_s']:.3f}",
                 f"{r['tokens_per_s']:.0f}", f"{r.get('model_flops_per_s', nan) / 1e9:.0f}", f"{r['rss_mib']:.0f}"]
        if device:
            cells.append(f"{r['device_peak_mib']:.0f}" if "device_peak_mib" in r else "")
        cells += [f"{r['others_cores']:.2f} / {r['others_cores_max']:.2f}", f"{r['cpu_per_wall']:.2f}",
                  f"{r.get('speed_ratio', nan):.2f}x", f"{r.get('fastest_ratio', nan):.2f}x",
                  f"{r.get('rss_ratio', nan):.2f}x"]
        if device:
            cells.append(f"{r['device_ratio']:.2f}x" if "device_ratio" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def interpretation(rows: list[dict]) -> str:
    sentences = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        best = next((r for r in rows if r["preset"] == preset and r.get("best")), None)
        peft = {r["dtype"]: r for r in rows if r["preset"] == preset and r["side"] == "peft"}
        if not best or not peft:
            continue
        parts = []
        for dtype in ("bf16", "fp32", "autocast"):
            if dtype in peft:
                p = peft[dtype]
                speed = p["speed_ratio"]
                faster = f"{speed:.2f}x as fast as" if speed >= 1 else f"{1 / speed:.2f}x slower than"
                memory = (f"device peak {best['device_peak_mib']:.0f} vs {p['device_peak_mib']:.0f} MiB, "
                          if "device_peak_mib" in p and "device_peak_mib" in best else "")
                parts.append(f"{faster} PEFT {dtype} ({best['step_s']:.2f} vs {p['step_s']:.2f} s/step; "
                             f"{memory}peak RSS {best['rss_mib']:.0f} vs {p['rss_mib']:.0f} MiB)")
        sentences.append(f"At {preset}, ours ({best['text']}) is " + "; ".join(parts) + ".")
    return " ".join(sentences)


def render(meta: dict, rows: list[dict]) -> str:
    a, facts = meta["args"], meta["facts"]
    gpu = next((r["device_name"] for r in meta.get("gpu_names", []) if r), None) if meta.get("gpu_names") else None
    peaks = {r["preset"]: r["matmul_peak"] for r in rows if r.get("best") and "matmul_peak" in r}
    peak_text = ("; `jora bench`'s measured 2048^3 matmul peak in its compute dtype (median): "
                 + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items())) if peaks else ""
    lines = [
        SECTION, "",
        f"Measured {meta['started']} with", "", "```", meta["command"], "```", "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['ram_gib']:.1f} GiB RAM, Linux {facts['kernel']}, "
        f"Python {facts['python']}, jax {facts['jax']}, torch {facts['torch']}, transformers {facts['transformers']}, "
        f"peft {facts['peft']}; PEFT on {a['device']}" + (f" ({gpu})" if gpu else "")
        + f". Load average (1, 5, 15 min) {meta['load_start']} at start, {meta['load_end']} at the end"
        + (" (a shared VM: other jobs ran beside these)." if a["device"] == "cpu" else "."), "",
        f"Same work on both sides: random weights of the preset's Llama shape, seq {a['seq']}, batch {a['batch']}, "
        f"LoRA r{LORA_R} alpha {LORA_ALPHA} dropout {LORA_DROPOUT} on {', '.join(TARGETS)}, AdamW, gradient clip "
        f"1.0; per run {a['warmup']} warm-up then {a['steps']} timed steps, one run (a fresh process) per "
        f"configuration per round, {a['rounds']} round(s), configurations alternating round-robin. "
        + huge_pages_text(a.get("huge_pages", False)) + " "
        "*Ours* = `jora bench` with COMPUTE,PARAM,REMAT (compute dtype, frozen-weight dtype, and what "
        "each rematerialised layer keeps: `jora train --help`); every setting tried is listed and the "
        "fastest per preset is *best*. *PEFT* = "
        f"transformers `LlamaForCausalLM` (random init, attention `{a['attn']}`) + peft `get_peft_model`, "
        f"torch.optim.AdamW, {a['threads']} torch threads: fp32 = model in float32; bf16 = model built in "
        "bfloat16 (pure bf16 base, as `model.to(torch.bfloat16)`; PEFT keeps the adapter in fp32); autocast = "
        "fp32 model with the forward under `torch.autocast(bfloat16)`. Step s = median over rounds of each run's "
        "median step; model GFLOP/s = the model FLOPs per step that `jora bench` counts (2 x forward, frozen "
        "base) over that step time, the same count for every row of a preset" + peak_text + ". Peak RSS = "
        "the child's `ru_maxrss` (wait4), median over rounds, start-up and libraries included"
        + ("; device peak = JAX's `peak_bytes_in_use` / torch's `max_memory_allocated`" if a["device"] == "cuda"
           else "") + ". Fastest step = the quickest single timed step of any round (contention only ever slows a step "
        "down). Others' CPU = the whole machine's busy CPU time (/proc/stat) during a run less the child's own, "
        "over the run's wall time, in cores: what other jobs took. CPU s / wall s = the child's user+system CPU "
        "time over its wall time (2.00 = both cores busy for the whole run; start-up and compilation included). "
        "Ratios compare ours (best) with each row: tokens/s ÷ (>1: ours faster), the same from the fastest "
        "steps, peak ÷ (<1: ours lighter).", "",
        *render_table(rows), "",
    ]
    load_notes = [f"round {r['round'] + 1}: load {r['load_start']} at start, {r['load_end']} at end"
                  + (f" (after waiting {r['waited_s']:.0f} s for load1 < {a['max_load']})" if r["waited_s"] else "")
                  for r in meta["rounds"]]
    lines += [f"Before each run the harness waited (up to {a.get('idle_wait', 0):.0f} s) for the machine's CPU use "
              f"over 5 s to fall below {a.get('idle_cores', 0)} cores. Load average per round: "
              + "; ".join(load_notes) + ".", ""]
    lines.append(interpretation(rows))
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"




def finish(meta: dict, results: list[dict], out: Path, write: bool) -> None:
    rows = summarise(results, meta["configs"])
    meta["gpu_names"] = [{"device_name": r["device_name"]} for r in results if "device_name" in r][:1]
    (out / "summary.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    section = render(meta, rows)
    print(section)
    if write:
        write_section(SECTION, section)
        print(f"wrote the '{SECTION}' section of {RESULTS}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_peft":
        peft_child(json.loads(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "_shape":
        shape_child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "base110m"],
                        help="jora bench presets: tiny, small, base110m, 7B, 13B, 70B")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (ours: compilation)")
    parser.add_argument("--ours", nargs="*", type=parse_ours, default=[parse_ours(t) for t in DEFAULT_OURS],
                        metavar="COMPUTE,PARAM,REMAT",
                        help=f"our settings to try (bf16/fp32 each); default: {' '.join(DEFAULT_OURS)}")
    parser.add_argument("--peft", nargs="*", choices=["fp32", "bf16", "autocast"], default=["bf16", "fp32"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for PEFT")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="PEFT's torch device; ours runs on JAX's default backend either way")
    parser.add_argument("--max-load", type=float, default=2.0, help="wait before each round for load1 below this")
    parser.add_argument("--load-wait", type=float, default=300, help="most seconds to wait for it (0: never)")
    parser.add_argument("--idle-cores", type=float, default=0.3,
                        help="before each run, wait until the whole machine's CPU use over 5 s is below this")
    parser.add_argument("--idle-wait", type=float, default=300, help="most seconds to wait for that (0: never)")
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                        help="run both sides with glibc.malloc.hugetlb=1, as `jora` runs itself (default)")
    parser.add_argument("--child-timeout", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for logs, every run's JSON line (runs.jsonl) and summary.json")
    parser.add_argument("--note", default="", help="a paragraph appended to the section")
    parser.add_argument("--render", type=Path, default=None, metavar="DIR",
                        help="measure nothing: re-render the section from DIR's summary.json and runs.jsonl")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS}")
    args = parser.parse_args()

    if args.render:
        meta = json.loads((args.render / "summary.json").read_text())
        meta.pop("rows", None)
        if args.note:
            meta["note"] = args.note
        results = [json.loads(line) for line in (args.render / "runs.jsonl").read_text().splitlines() if line]
        finish(meta, results, args.render, args.write)
        return

    command = shlex.join([os.path.relpath(a, REPO) if a == __file__ else a for a in sys.orig_argv])
    command = command.replace(str(REPO) + "/", "")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = loadavg()
    out = args.out or Path(os.environ.get("TMPDIR", "/tmp")) / "jora-peft-compare"
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    runs_path.write_text("")

    child_env = child_environment(args.huge_pages)
    args.huge_pages = tunes_huge_pages(child_env)  # what the children got
    shapes = {}
    for preset in args.presets:
        shapes[preset] = run_child([sys.executable, __file__, "_shape", preset], out / f"shape-{preset}.log", 300)
        for k in ("maxrss_mib", "cpu_s", "wall_s"):
            shapes[preset].pop(k)
    configs = []
    for preset in args.presets:
        for o in args.ours:
            configs.append({"side": "ours", "preset": preset, **o})
        for dtype in args.peft:
            configs.append({"side": "peft", "preset": preset, "dtype": dtype})
    for c in configs:
        c["key"] = f"{c['preset']}|{config_label(c)}"
        c["seq_tokens"] = args.seq * args.batch

    results, rounds_log, failures = [], [], []
    for rnd in range(args.rounds):
        wait = wait_for_quiet(args.max_load, args.load_wait)
        print(f"round {rnd + 1}/{args.rounds}: {wait}", file=sys.stderr, flush=True)
        for preset in args.presets:
            block = [c for c in configs if c["preset"] == preset]
            shift = rnd % len(block)
            for c in block[shift:] + block[:shift]:
                log = out / f"{c['key'].replace('|', '-').replace(' ', '_').replace(',', '-')}-{rnd}.log"
                idle = wait_for_idle(args.idle_cores, args.idle_wait)
                before = loadavg()
                try:
                    r = run_child(build_argv(c, args, shapes[preset]), log, args.child_timeout, child_env)
                except RuntimeError as exc:
                    print(f"FAILED {c['key']}: {exc}", file=sys.stderr, flush=True)
                    failures.append({"key": c["key"], "round": rnd, "error": str(exc)[-2000:]})
                    continue
                r.update(key=c["key"], round=rnd, load_before=before, load_after=loadavg(), **idle)
                results.append(r)
                with open(runs_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"  {c['key']}: step {r['median_step_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s, "
                      f"maxrss {r['maxrss_mib']:.0f} MiB, cpu/wall {r['cpu_s'] / r['wall_s']:.2f}, "
                      f"wall {r['wall_s']:.0f} s, others {r['others_cores']:.2f} cores, steal "
                      f"{r['steal_cores']:.2f}, idle wait {idle['idle_wait_s']:.0f} s, load {before} -> "
                      f"{r['load_after']}", file=sys.stderr, flush=True)
        rounds_log.append({"round": rnd, **wait, "load_end": loadavg()})

    arg_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "ours"}
    meta = {"command": command, "started": started, "facts": machine_facts(), "args": arg_record,
            "shapes": shapes, "configs": configs, "rounds": rounds_log, "failures": failures,
            "load_start": load_start, "load_end": loadavg(), "note": args.note}
    finish(meta, results, out, args.write)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this harness's own peak RSS: {own:.0f} MiB; results under {out})", file=sys.stderr)
    if failures:
        print(f"{len(failures)} run(s) failed: {[f['key'] for f in failures]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
