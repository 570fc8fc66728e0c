"""One timed comparison on a GPU, for benchmarks/gpu.sh: jora's train step with the portable and the cpu
kernel sets against Hugging Face PEFT (eager with sdpa attention, then under torch.compile) at one Llama
shape (7B), seq 512 and 2048, batch 1, within a deadline.

First a smoke test (at most --smoke-s seconds): a few steps of the tiny preset on each side, which must
run on the expected device with a finite loss. Then each configuration runs in its own child process,
so that its device-memory figures are its own, in priority order; one that would not fit in the time
left is skipped and said so. Per run: median step time, tokens/s, MFU (model FLOPs per step as
`jora bench` counts them, over the step time, over the device's datasheet bf16 dense peak; null for a
device not in DATASHEET_BF16), device memory in use after the weights are loaded and the peak during
the run. The first portable run also saves a jax.profiler trace of two steps (one, if two do not fit
in TRACE_LIMIT compressed). JAX children never import torch and PEFT children never import JAX
(--torch-python may name another interpreter, e.g. a venv holding only the CUDA torch).

--extra-presets (gpu.sh: EXTRA_PRESETS, default small128k) adds, after the main preset's eager runs and
before torch.compile's, jora portable + PEFT eager at each named preset and the first seq: small128k is
`small` with Llama 3's 128,256-token vocabulary, a step dominated by the output head and the loss.

    python benchmarks/gpu_bench.py --out DIR --deadline EPOCH_S [--preset 7B --device cuda ...]

Writes to --out: env.txt, runs.jsonl (every child's JSON line), summary.json, section.md (the table as
benchmarks/RESULTS.md shows it), trace.tgz, logs.tgz (every child's stdout and stderr). This parent
imports no JAX or torch.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_compare import (LORA_ALPHA, LORA_DROPOUT, LORA_R, TARGETS, child_environment,  # noqa: E402
                          machine_facts, run_child)

SECTION = "## Training speed on one GPU vs PEFT"
GIB = 1024 ** 3
TRACE_LIMIT = 15 * 1024 ** 2  # the device tool returns files of at most 16 MiB
# Datasheet dense bf16 peaks (no sparsity), FLOP/s; the first entry whose words are all in the device's
# name wins, so the more specific names come first.
DATASHEET_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                  ("H200", 989e12), ("A100", 312e12)]
# Seconds a run needs besides its steps (start-up, compilation, random weights), until a finished run of
# the same kind says better.
SETUP_GUESS_S = {"cuda": {"jora": 120, "peft eager": 60, "peft compile": 240},
                 "cpu": {"jora": 30, "peft eager": 15, "peft compile": 120}}
RESERVE_S = 10  # kept back for writing the results
JAX_SIDE = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "dm-haiku", "optax", "numpy")


def datasheet_peak(name: str | None) -> float | None:
    for key, flops in DATASHEET_BF16:
        if name and all(word.lower() in name.lower() for word in key.split()):
            return flops
    return None


# ---------------------------------------------------------------------------------------------
# Children (each prints JSON lines; the last one is its result)
# ---------------------------------------------------------------------------------------------

def timed(run, spec: dict) -> dict:
    """Warm-up steps, then timed ones; stops early (keeping at least 2) when the next would pass the deadline."""
    warm, times, loss = [], [], float("nan")
    for i in range(spec["warmup"] + spec["steps"]):
        if len(times) >= 2 and time.time() + statistics.median(times) > spec["deadline"]:
            break
        start = time.perf_counter()
        loss = run()
        (times if i >= spec["warmup"] else warm).append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"warmup_s": warm, "step_times_s": times, "median_step_s": step_s, "min_step_s": min(times),
            "tokens_per_s": spec["seq"] * spec["batch"] / step_s, "timed_steps": len(times),
            "final_loss": loss, "loss_finite": math.isfinite(loss)}


def jora_child(spec: dict) -> None:
    from importlib import metadata

    import jax

    from jora_model.backends import resolve_kernels
    from jora_model.training import step as step_module
    from jora_model.training.bench import BenchSettings, PreparedStep

    passed = {}  # what the step factory was really given: the report must not claim a kernel set it never got
    factory = step_module.make_step_functions

    def recording(*args, **kwargs):
        passed["kernels"] = inspect.signature(factory).bind(*args, **kwargs).arguments.get("kernels", "auto")
        return factory(*args, **kwargs)

    step_module.make_step_functions = recording
    started = time.perf_counter()
    prepared = PreparedStep(BenchSettings(preset=spec["preset"], seq=spec["seq"], batch=spec["batch"],
                                          steps=spec["steps"], warmup=spec["warmup"], kernels=spec["kernels"]))
    device = jax.local_devices()[0]
    loaded = device.memory_stats() or {}
    out = {"side": "jora", "kernels": spec["kernels"], "build_s": time.perf_counter() - started,
           "kernels_used": resolve_kernels(passed["kernels"], device.platform) if passed else None,
           "platform": device.platform, "device_kind": device.device_kind,
           "versions": {p: metadata.version(p) for p in JAX_SIDE if list(metadata.distributions(name=p))},
           "device_loaded_bytes": loaded.get("bytes_in_use"), "device_load_peak_bytes": loaded.get("peak_bytes_in_use"),
           **timed(prepared.run, spec)}
    if prepared.fns.train_step.compiled_signatures != 1:
        raise RuntimeError(f"the step compiled {prepared.fns.train_step.compiled_signatures} times; expected once")
    stats = device.memory_stats() or {}
    out.update(device_peak_bytes=stats.get("peak_bytes_in_use"), device_limit_bytes=stats.get("bytes_limit"))
    print(json.dumps(out), flush=True)
    if spec.get("trace_tar"):
        try:
            out.update(trace_steps(prepared.run, spec))
        except Exception as exc:  # the timing stands without a trace
            out["trace_error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(json.dumps(out), flush=True)


def trace_steps(run, spec: dict) -> dict:
    """A jax.profiler trace of 2 steps, tarred (1 step if 2 are too big). A watchdog ends the process if
    the profiler hangs; the result line is already printed by then."""
    import jax

    watchdog = threading.Timer(max(min(spec["deadline"] - time.time(), 90), 1), os._exit, (0,))
    watchdog.daemon = True
    watchdog.start()
    tar_path = Path(spec["trace_tar"])
    size = 0
    for steps in (2, 1):
        folder = tempfile.mkdtemp(prefix="jora-trace-")
        with jax.profiler.trace(folder):
            for _ in range(steps):
                run()
        with tarfile.open(tar_path, "w:gz") as tar:
            tar.add(folder, arcname="trace")
        shutil.rmtree(folder, ignore_errors=True)
        size = tar_path.stat().st_size
        if size <= TRACE_LIMIT:
            watchdog.cancel()
            return {"trace_steps": steps, "trace_bytes": size}
    tar_path.unlink()
    watchdog.cancel()
    return {"trace_error": f"a one-step trace is {size / 2 ** 20:.0f} MiB compressed, over {TRACE_LIMIT / 2 ** 20:.0f}"}


def peft_child(spec: dict) -> None:
    import peft
    import torch
    import transformers

    from peft_compare import peft_step

    started = time.perf_counter()
    step, model, _ = peft_step({**spec, "dtype": "bf16", "attn": "sdpa"})
    cuda = spec["device"] == "cuda"
    out = {"side": "peft", "mode": spec["mode"], "device": spec["device"], "attn": model.config._attn_implementation,
           "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
           "versions": {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                        "transformers": transformers.__version__, "peft": peft.__version__}}
    if cuda:  # the peak from here on: the weights are in place, the optimizer state not yet
        torch.cuda.synchronize()
        out["device_loaded_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if spec["mode"] == "compile":
        model.compile()  # in place: the step's model(...) calls go through torch.compile
    out["build_s"] = time.perf_counter() - started
    out.update(timed(step, spec))
    if cuda:
        out.update(device_peak_bytes=torch.cuda.max_memory_allocated(),
                   device_peak_reserved_bytes=torch.cuda.max_memory_reserved())
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work or tempfile.mkdtemp(prefix="jora-gpu-bench-"))
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.env = child_environment(True)
        self.env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")])),
                        JAX_COMPILATION_CACHE_DIR=str(self.work / "jax-cache"),  # the weights' many small jits
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        XLA_PYTHON_CLIENT_MEM_FRACTION="0.9")  # JAX's share of the GPU (default 0.75)
        self.results: list[dict] = []
        self.lock = threading.Lock()
        (args.out / "runs.jsonl").write_text("")

    def left(self) -> float:
        return self.args.deadline - time.time() - RESERVE_S

    def run(self, name: str, spec: dict, timeout: float, phase: str = "timing", env: dict | None = None) -> dict:
        """One child; its result (or failure) with name, spec and timing, appended to runs.jsonl."""
        spec = {**spec, "deadline": time.time() + timeout - 5}
        python = sys.executable if spec["side"] == "jora" else self.args.torch_python
        argv = [python, __file__, "_" + spec["side"], json.dumps(spec)]
        env = {**self.env, **(env or {})}
        started = time.time()
        print(f"== [{self.args.deadline - started:.0f} s left] {name} (timeout {timeout:.0f} s)", flush=True)
        try:
            result = {**run_child(argv, self.work / "logs" / f"{name.replace(' ', '_')}.log", timeout, env),
                      "status": "ok"}
        except RuntimeError as exc:
            wall = time.time() - started
            why = f"timed out after {wall:.0f} s" if wall >= timeout - 1 else "failed"
            result = {"status": why, "error": str(exc)[-1500:], "wall_s": wall}
        result.update(name=name, phase=phase, spec={k: v for k, v in spec.items() if k != "shape"})
        with self.lock:
            self.results.append(result)
            with open(self.args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            done = (f"step {result['median_step_s']:.4f} s, {result['tokens_per_s']:.0f} tokens/s, wall "
                    f"{result['wall_s']:.0f} s" if "median_step_s" in result else result["error"][-600:])
            print(f"   {name}: {result['status']}: {done}", flush=True)
        return result


def smoke(runner: Runner, shape: dict) -> dict[str, str | None]:
    """A few steps of the tiny preset on each side, both at once (JAX without preallocating the device):
    None where it passed, else why not."""
    a = runner.args
    base = {"preset": "tiny", "seq": 128, "batch": 1, "steps": 2, "warmup": 1}
    specs = {"jora": {**base, "side": "jora", "kernels": "portable"},
             "peft": {**base, "side": "peft", "mode": "eager", "shape": shape, "device": a.device,
                      "threads": a.threads}}
    expected = {"jora": ("platform", "gpu" if a.device == "cuda" else "cpu"), "peft": ("device", a.device)}
    timeout = min(a.smoke_s, runner.left())
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(specs, pool.map(lambda side: runner.run(
            f"smoke {side}", specs[side], timeout, "smoke", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}), specs)))
    verdict: dict[str, str | None] = {}
    for side, r in done.items():
        key, want = expected[side]
        if r["status"] != "ok":
            verdict[side] = r["status"]
        elif r.get(key) != want:
            verdict[side] = f"ran on {r.get(key)}, not {want}"
        elif not (r["loss_finite"] and 5 < r["final_loss"] < 15):  # about ln(32000) = 10.4 at random init
            verdict[side] = f"loss {r['final_loss']}"
        else:
            verdict[side] = None
    return verdict


def plan(seqs: list[int], extra_presets: list[str] = ()) -> list[dict]:
    """Configurations, most wanted first. Each extra preset (e.g. small128k: Llama 3's 128k head on a small
    body) runs once at the first seq, jora portable kernels and PEFT eager, after the main preset's eager
    runs and before torch.compile's; those without a "preset" key take the main one."""
    first, rest = seqs[0], seqs[1:]
    jora = lambda kernels, seq, **kw: {"side": "jora", "kernels": kernels, "seq": seq, **kw}  # noqa: E731
    peft = lambda mode, seq, **kw: {"side": "peft", "mode": mode, "seq": seq, **kw}  # noqa: E731
    order = [jora("portable", first, trace=True), peft("eager", first), jora("cpu", first)]
    for seq in rest:
        order += [jora("portable", seq), peft("eager", seq), jora("cpu", seq)]
    for name in extra_presets:
        order += [jora("portable", first, preset=name), peft("eager", first, preset=name)]
    return order + [peft("compile", seq) for seq in seqs]


def label(c: dict) -> str:
    return f"jora {c['kernels']} kernels" if c["side"] == "jora" else (
        "PEFT eager" if c["mode"] == "eager" else "PEFT torch.compile")


def kind(c: dict) -> str:
    return "jora" if c["side"] == "jora" else f"peft {c['mode']}"


def flops_of(spec: dict) -> float:
    """Model FLOPs of one step of spec's preset, seq and batch (`jora bench`'s count; numpy only)."""
    from jora_model.model.config import preset
    from jora_model.training.bench import model_flops_per_step

    return model_flops_per_step(preset(spec["preset"]), spec["seq"], spec["batch"])


def estimate(c: dict, done: list[dict], device: str) -> float:
    """Seconds config c should take: the setup of the last finished run of its kind (else a guess), plus
    its steps at the step time of a finished run of its kind scaled by model FLOPs (else nothing)."""
    same = [r for r in done if r["status"] == "ok" and r["phase"] == "timing" and kind(r["spec"]) == kind(c)]
    if not same:
        return SETUP_GUESS_S[device][kind(c)]
    r = same[-1]
    setup = r["wall_s"] - sum(r["warmup_s"]) - sum(r["step_times_s"])
    step = r["median_step_s"] * flops_of(c) / flops_of(r["spec"])
    compile_s = max(r["warmup_s"][:1] + [0]) * 1.5  # torch compiles in the first step
    return setup + compile_s + (c["warmup"] + c["steps"]) * step * 1.2


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("_jora", "_peft"):
        (jora_child if sys.argv[1] == "_jora" else peft_child)(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="children's logs and caches (default: a new temporary folder)")
    parser.add_argument("--deadline", type=float, default=time.time() + 560, help="epoch seconds to finish by")
    parser.add_argument("--preset", default="7B")
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--extra-presets", nargs="*", default=[],
                        help="also run these presets (jora portable + PEFT eager at the first seq), e.g. small128k")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the DRY_RUN rehearsal")
    parser.add_argument("--torch-python", default=sys.executable, help="the interpreter of the PEFT children")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--smoke-s", type=float, default=60)
    parser.add_argument("--command", default="bash benchmarks/gpu.sh", help="what to show as the command")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from jora_model.model.config import preset  # numpy only: no JAX
    from jora_model.training.bench import model_flops_per_step

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runner = Runner(args)
    config = preset(args.preset)
    flops = {seq: model_flops_per_step(config, seq, args.batch) for seq in args.seqs}

    verdict = smoke(runner, preset("tiny").to_dict())
    write_env(runner, verdict)
    common = {"preset": args.preset, "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    skipped = []
    for order, c in enumerate(plan(args.seqs, args.extra_presets)):
        c = {**common, **c, "order": order}
        if c["side"] == "peft":
            c.update(shape=preset(c["preset"]).to_dict(), device=args.device, threads=args.threads)
        name = f"{label(c)} seq {c['seq']}" + (f" {c['preset']}" if c["preset"] != args.preset else "")
        need, left = estimate(c, runner.results, args.device), runner.left()
        if verdict[c["side"]]:
            why = f"the {c['side']} smoke test did not pass ({verdict[c['side']]})"
        elif need > left:
            why = f"would not fit: needs about {need:.0f} s, {max(left, 0):.0f} s left"
        else:
            if c.pop("trace", False):
                c["trace_tar"] = str(runner.work / "trace.tgz")
            runner.run(name, c, min(left, max(3 * need, 120)))
            continue
        skipped.append({"name": name, "spec": c, "status": "skipped", "why": why})
        print(f"== skipped {name}: {why}", flush=True)
    finish(runner, verdict, skipped, flops, started)


def write_env(runner: Runner, verdict: dict) -> None:
    """env.txt: the interpreters, the machine, the versions each side's smoke child ran with, nvidia-smi."""
    lines = [f"jax python: {sys.executable}", f"torch python: {runner.args.torch_python}",
             f"machine: {json.dumps(machine_facts())}", f"smoke: {json.dumps(verdict)}"]
    for r in runner.results:
        if r["status"] == "ok":
            lines.append(f"{r['name']}: " + json.dumps({k: r.get(k) for k in (
                "versions", "platform", "device_kind", "kernels_used") if r.get(k) is not None}))
    if shutil.which("nvidia-smi"):
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
    else:
        lines.append("nvidia-smi: not found")
    (runner.args.out / "env.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:-1]), flush=True)


def finish(runner: Runner, verdict: dict, skipped: list[dict], flops: dict, started: str) -> None:
    a, out = runner.args, runner.args.out
    runs = [r for r in runner.results if r["phase"] == "timing"]
    for r in runs:
        if r["status"] == "ok":
            r["model_flops_per_s"] = flops_of(r["spec"]) / r["median_step_s"]
            peak = datasheet_peak(r.get("device_kind"))
            r["mfu"] = r["model_flops_per_s"] / peak if peak else None
    trace = runner.work / "trace.tgz"
    if trace.exists():
        shutil.copy(trace, out / "trace.tgz")
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        tar.add(runner.work / "logs", arcname="logs")
    rows = sorted(runs + skipped, key=lambda r: r["spec"]["order"])
    failed = [r["name"] for r in runs if r["status"] != "ok" and r["spec"].get("mode") != "compile"]
    summary = {"started": started, "command": a.command, "preset": a.preset, "seqs": a.seqs, "batch": a.batch,
               "steps": a.steps, "warmup": a.warmup, "device": a.device, "extra_presets": a.extra_presets, "smoke": verdict, "failed": failed,
               "model_flops_per_step": flops, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    section = render(summary, runner.results)
    (out / "section.md").write_text(section)
    print(section, flush=True)
    if not a.work:
        shutil.rmtree(runner.work, ignore_errors=True)
    bad = [k for k, v in verdict.items() if v] + failed
    sys.exit(f"not all passed: {bad}" if bad else 0)


def render(s: dict, results: list[dict]) -> str:
    ok = [r for r in s["rows"] if r["status"] == "ok"]
    kinds = sorted({r["device_kind"] for r in ok})
    peaks = {k: datasheet_peak(k) for k in kinds}
    versions = next((r["versions"] for r in results if r.get("side") == "peft" and r["status"] == "ok"), {})
    jax_side = next((r for r in results if r.get("side") == "jora" and r["status"] == "ok"), None)
    jax_text = ", ".join(f"{k} {v}" for k, v in jax_side["versions"].items()) if jax_side else "JAX did not run"
    device_text = ", ".join(f"{k} (datasheet bf16 dense peak " + (f"{p / 1e12:.0f} TFLOP/s)" if p else
                                                                  "unknown: no MFU)") for k, p in peaks.items())
    lines = [SECTION, "", f"Measured {s['started']} with", "", "```", s["command"], "```", "",
             f"Device: {device_text or 'none ran'}; {jax_text} (platform {jax_side['platform'] if jax_side else '?'}); "
             f"torch {versions.get('torch', '?')} (CUDA {versions.get('torch_cuda') or 'none'}), transformers "
             f"{versions.get('transformers', '?')}, peft {versions.get('peft', '?')}; more in env.txt. Smoke test: "
             + ", ".join(f"{k} {'passed' if not v else v}" for k, v in s["smoke"].items()) + ".", "",
             f"Same work on both sides: random weights of the {s['preset']} preset's Llama shape, batch {s['batch']}, "
             f"LoRA r{LORA_R} alpha {LORA_ALPHA} dropout {LORA_DROPOUT} on {', '.join(TARGETS)}, AdamW, gradient "
             f"clip 1.0; {s['warmup']} warm-up then up to {s['steps']} timed steps per run (fewer when the time "
             "budget ran short), each configuration in a fresh process. *jora* = `jora bench`'s step (bf16 compute, "
             "bf16 frozen weights, remat matmuls) with the named kernel set; *PEFT* = transformers "
             "`LlamaForCausalLM` in bf16 with sdpa attention + peft `get_peft_model`, eager or after "
             "`model.compile()` (torch.compile). MFU = model FLOPs per step (`jora bench`'s count: 2 x the "
             "frozen base's forward, attention included) / median step time / the datasheet peak. After load = "
             "device memory in use once weights, adapter and batch are in place; peak = the most in use during "
             "the run (JAX `peak_bytes_in_use`, which spans loading too; torch `max_memory_allocated` after a reset "
             "once the weights are loaded). Speed and peak vs PEFT eager: its step time / this one (>1: faster) "
             "and this peak / its peak, at the same seq" + (
                 f" (and preset). Extra presets ({', '.join(s['extra_presets'])}; rows \"preset, seq\"): the same "
                 "two sides at that preset's shape, jora portable and PEFT eager only; small128k is `small` with "
                 "Llama 3's 128,256-token vocabulary, where the output head and the loss are most of the step."
                 if s.get("extra_presets") else "."), "",
             "| seq | configuration | step s (median) | timed steps | tokens/s | MFU | after load GiB | peak GiB "
             "| speed vs PEFT eager | peak vs PEFT eager |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gib = lambda b: f"{b / GIB:.1f}" if b is not None else ""  # noqa: E731
    notes = []
    groups = [(str(seq), [r for r in s["rows"] if r["spec"]["seq"] == seq and r["spec"]["preset"] == s["preset"]])
              for seq in s["seqs"]]
    groups += [(f"{name}, {s['seqs'][0]}", [r for r in s["rows"] if r["spec"]["preset"] == name])
               for name in s.get("extra_presets", [])]
    for seq, here in groups:
        base = next((r for r in here if r["status"] == "ok" and r["spec"].get("mode") == "eager"), None)
        for r in here:
            name = label(r["spec"])
            if r["status"] != "ok":
                lines.append(f"| {seq} | {name} | {r.get('why') or r['status']} | | | | | | | |")
                continue
            if r["spec"]["side"] == "jora" and r.get("kernels_used") != r["spec"]["kernels"]:
                name += f" (ran {r.get('kernels_used') or 'unknown'} kernels!)"
                notes.append(f"{label(r['spec'])} at seq {seq}: the step factory got kernels="
                             f"{r.get('kernels_used')}, not {r['spec']['kernels']}.")
            speed = f"{base['median_step_s'] / r['median_step_s']:.2f}x" if base else ""
            mem = (f"{r['device_peak_bytes'] / base['device_peak_bytes']:.2f}x"
                   if base and r.get("device_peak_bytes") and base.get("device_peak_bytes") else "")
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "null"
            lines.append(f"| {seq} | {name} | {r['median_step_s']:.4f} | {r['timed_steps']} | {r['tokens_per_s']:.0f} "
                         f"| {mfu} | {gib(r.get('device_loaded_bytes'))} | {gib(r.get('device_peak_bytes'))} "
                         f"| {speed} | {mem} |")
    for r in s["rows"]:
        if "trace_steps" in r:
            notes.append(f"trace.tgz: a jax.profiler trace of {r['trace_steps']} step(s) of {r['name']} "
                         f"({r['trace_bytes'] / 2 ** 20:.1f} MiB; TensorBoard's or XProf's profile plugin reads it).")
        elif r["spec"].get("trace_tar") and r["status"] == "ok":
            notes.append(f"No trace: {r.get('trace_error', 'the profiler did not finish in time')}.")
        if r["status"] not in ("ok", "skipped"):
            notes.append(f"{r['name']} {r['status']}: see logs.tgz.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


if __name__ == "__main__":
    main()
