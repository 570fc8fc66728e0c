"""Peak host memory of `jora convert`: it must stay near the largest tensor, not the model.

Generates (once, cached in --workdir) random bf16 Llama checkpoints in Meta's layout (two
model-parallel consolidated.NN.pth shards, split as fairscale splits them) and in the Hugging Face
layout (two safetensors files plus model.safetensors.index.json), then runs `jora convert` on each,
to a bf16 and to an fp32 store, in a child process, three times, and reports the child's peak
resident set size (os.wait4's ru_maxrss) against two baselines:

* imports: a child that only imports what the conversion imports (torch only for Meta's layout,
  which needs torch.load; the HF reader never imports torch);
* tiny: `jora convert` of a 2-layer, 64-wide model of the same layout, i.e. every code path run with
  negligible tensors.

"peak - baseline" is what the conversion itself holds; it is compared with the largest tensor (at
the source dtype and at the store's dtype) and with the checkpoint's size.

Measurement notes:
* ru_maxrss counts file-backed pages of mappings (the mmap'd shards) as well as anonymous memory.
  A sampler also polls /proc/PID/status (RssAnon, RssFile) every few milliseconds and reports the
  split at the highest sample; it can miss a brief peak, ru_maxrss cannot.
* Linux folds the hiwater RSS of the memory image an exec replaces into the child's ru_maxrss, and
  subprocess starts children with vfork/posix_spawn from this process's image. So this parent imports
  nothing heavy (no torch, no numpy: the checkpoints are generated in a child too) and its own peak is
  printed to show it is far below every number measured.

    .venv/bin/python benchmarks/convert_memory.py --size medium large --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

from _report import RESULTS, loadavg, write_section  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Conversion peak memory"
MIB = 1024 ** 2

# Llama-2-like shapes at a width that keeps the files small; only the depth differs between the
# sizes, so the largest tensor (the 32000 x 1024 embedding and output head) is the same in all of them
# while the checkpoint grows: a peak that tracks the model would show up as a trend across sizes.
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab=256),
    "small": dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, multiple_of=256, vocab=32000),
    "medium": dict(dim=1024, n_layers=20, n_heads=16, n_kv_heads=4, multiple_of=256, vocab=32000),
    "large": dict(dim=1024, n_layers=48, n_heads=16, n_kv_heads=4, multiple_of=256, vocab=32000),
}
N_SHARDS = 2
SEED = 1234
GENERATOR_VERSION = 1
BASELINE_PRESET = "tiny"

# The imports of a conversion, without the conversion (torch only where the reader uses it).
IMPORTS = {
    "meta": "import numpy, ml_dtypes, torch, tqdm, click; import pipeline.cli, stages.convert, "
            "jora_model.formats.meta_checkpoint, jora_model.formats.store, jora_model.formats.safetensors_io",
    "hf": "import numpy, ml_dtypes, tqdm, click; import pipeline.cli, stages.convert, "
          "jora_model.formats.hf_checkpoint, jora_model.formats.store, jora_model.formats.safetensors_io",
}


# ---------------------------------------------------------------------------------------------
# Shapes (pure Python: the parent stays free of numpy and torch)
# ---------------------------------------------------------------------------------------------

def ffn_dim(p: dict) -> int:
    """Meta's FeedForward hidden width (model.py) with ffn_dim_multiplier unset."""
    hidden = int(2 * (4 * p["dim"]) / 3)
    return p["multiple_of"] * ((hidden + p["multiple_of"] - 1) // p["multiple_of"])


def meta_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) Meta tensor shapes, [out, in] for linears, in Meta's file order."""
    d, f, v = p["dim"], ffn_dim(p), p["vocab"]
    kv = p["n_kv_heads"] * (d // p["n_heads"])
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d), "norm.weight": (d,),
                                          "output.weight": (v, d)}
    for i in range(p["n_layers"]):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (d, d), f"layers.{i}.attention.wk.weight": (kv, d),
            f"layers.{i}.attention.wv.weight": (kv, d), f"layers.{i}.attention.wo.weight": (d, d),
            f"layers.{i}.feed_forward.w1.weight": (f, d), f"layers.{i}.feed_forward.w2.weight": (d, f),
            f"layers.{i}.feed_forward.w3.weight": (f, d),
            f"layers.{i}.attention_norm.weight": (d,), f"layers.{i}.ffn_norm.weight": (d,),
        })
    shapes["rope.freqs"] = (d // p["n_heads"] // 2,)
    return shapes


def largest_tensor_elements(p: dict) -> int:
    sizes = [1]
    for name, shape in meta_shapes(p).items():
        if name != "rope.freqs":
            n = 1
            for s in shape:
                n *= s
            sizes.append(n)
    return max(sizes)


def param_count(p: dict) -> int:
    total = 0
    for name, shape in meta_shapes(p).items():
        if name != "rope.freqs":
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


# ---------------------------------------------------------------------------------------------
# Checkpoint generation (runs in a child: `convert_memory.py _generate DIR PRESET`)
# ---------------------------------------------------------------------------------------------

META_SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _split_dim(name: str) -> int | None:
    if name.endswith("norm.weight") or name == "rope.freqs":
        return None
    return META_SPLIT[name.split(".")[-2]]


def _hf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{HF_LAYER_NAMES[rest]}"
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[name]


def _rope_permute(w, n_heads: int):
    """Meta's interleaved rotary rows -> HF rotate-half rows, per head (transformers'
    convert_llama_weights_to_hf.permute)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def generate(out: Path, preset: str) -> None:
    """Random bf16 weights (std 1/sqrt(fan_in), norms near 1) written as a Meta checkpoint in
    out/meta and the same model as an HF directory in out/hf, without using jora."""
    import torch
    from safetensors.torch import save_file

    p = PRESETS[preset]
    shapes = meta_shapes(p)
    full: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(SEED)
    for name, shape in shapes.items():
        if name == "rope.freqs":
            e = p["dim"] // p["n_heads"]
            full[name] = (1.0 / 10000.0 ** (torch.arange(0, e, 2)[: e // 2].float() / e)).to(torch.bfloat16)
        elif len(shape) == 1:
            full[name] = (1.0 + 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        else:
            std = 1.0 / shape[1] ** 0.5
            full[name] = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    meta = out / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    params = {"dim": p["dim"], "multiple_of": p["multiple_of"], "n_heads": p["n_heads"],
              "n_kv_heads": p["n_kv_heads"], "n_layers": p["n_layers"], "norm_eps": 1e-05, "vocab_size": -1}
    (meta / "params.json").write_text(json.dumps(params))
    for rank in range(N_SHARDS):
        shard = {}
        for name, tensor in full.items():
            d = _split_dim(name)
            shard[name] = tensor.clone() if d is None else torch.chunk(tensor, N_SHARDS, dim=d)[rank].clone()
        torch.save(shard, meta / f"consolidated.{rank:02d}.pth")
        del shard

    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if name == "rope.freqs":
            continue
        if name.endswith("attention.wq.weight"):
            tensor = _rope_permute(tensor, p["n_heads"]).contiguous()
        elif name.endswith("attention.wk.weight"):
            tensor = _rope_permute(tensor, p["n_kv_heads"]).contiguous()
        tensors[_hf_name(name)] = tensor
    order = ["model.embed_tokens.weight"] + [k for k in tensors if k.startswith("model.layers.")] + \
        ["model.norm.weight", "lm_head.weight"]
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files: list[list[str]] = [[]]
    acc = 0
    for key in order:  # two files of about half the bytes each, as save_pretrained shards them
        if files[-1] and acc >= total / 2 and len(files) < 2:
            files.append([])
        files[-1].append(key)
        acc += tensors[key].numel() * tensors[key].element_size()
    weight_map = {}
    for i, keys in enumerate(files):
        file_name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(hf / file_name), metadata={"format": "pt"})
        weight_map.update({k: file_name for k in keys})
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": p["dim"], "intermediate_size": ffn_dim(p), "num_hidden_layers": p["n_layers"],
        "num_attention_heads": p["n_heads"], "num_key_value_heads": p["n_kv_heads"],
        "vocab_size": p["vocab"], "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }
    (hf / "config.json").write_text(json.dumps(config, indent=2))


def ensure_checkpoint(workdir: Path, preset: str) -> Path:
    """workdir/PRESET/{meta,hf}, generated by a child process unless already there."""
    root = workdir / preset
    marker = root / "generated.json"
    spec = {"preset": PRESETS[preset], "n_shards": N_SHARDS, "seed": SEED, "version": GENERATOR_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"generating the {preset} checkpoint in {root} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_generate", str(root), preset],
                   check=True, cwd=REPO)
    marker.write_text(json.dumps(spec))
    print(f"  done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return root


def checkpoint_bytes(src: Path, layout: str) -> int:
    pattern = "consolidated.*.pth" if layout == "meta" else "*.safetensors"
    return sum(p.stat().st_size for p in src.glob(pattern))


# ---------------------------------------------------------------------------------------------
# Measuring a child
# ---------------------------------------------------------------------------------------------

_STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _read_status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, OSError):
        return None
    values = {}
    for field in _STATUS_FIELDS:
        m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        if m:
            values[field] = int(m.group(1))
    return values if "VmRSS" in values else None


def measure(argv: list[str], log_path: Path, interval: float = 0.005) -> dict:
    """Run argv in a child; its peak RSS (KiB, from wait4), wall seconds, and the RssAnon/RssFile
    split at the highest /proc sample."""
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        best: dict[str, int] = {}
        done = threading.Event()

        def sample() -> None:
            nonlocal best
            while not done.is_set():
                s = _read_status(proc.pid)
                if s and s["VmRSS"] > best.get("VmRSS", -1):
                    best = s
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed with status {proc.returncode}; see {log_path}:\n"
                         + log_path.read_text()[-3000:])
    return {"maxrss_kib": usage.ru_maxrss, "wall_s": wall, "sample": best}


def jora_executable() -> str:
    candidate = Path(sys.executable).parent / "jora"
    found = str(candidate) if candidate.exists() else shutil.which("jora")
    if not found:
        raise SystemExit("the jora command was not found; run this with the project's virtualenv python")
    return found


def run_convert(src: Path, out: Path, dtype: str, log_path: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = measure([jora_executable(), "convert", str(src), str(out), "--dtype", dtype, "--force"], log_path)
    if not (out / "store.json").is_file():
        raise SystemExit(f"jora convert wrote no store.json in {out}; see {log_path}")
    result["store_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.0f}"


def machine_facts() -> dict:
    mem_total = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    versions = {}
    for package in ("torch", "numpy", "ml_dtypes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {
        "nproc": len(os.sched_getaffinity(0)), "ram_gib": int(mem_total.group(1)) / 1024 ** 2 if mem_total else None,
        "cpu": model.group(1).strip() if model else platform.processor(), "kernel": platform.release(),
        "python": platform.python_version(), **versions,
    }



def render(rows: list[dict], baselines: dict, facts: dict, command: str, started: str, load_start: str,
           load_before: str, load_after: str, reps: int) -> str:
    largest = max(largest_tensor_elements(PRESETS[r["size"]]) for r in rows)
    lines = [
        SECTION, "",
        f"Measured {started} with", "", "```", command, "```", "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['ram_gib']:.1f} GiB RAM, Linux "
        f"{facts['kernel']}, Python {facts['python']}, torch {facts['torch']}, numpy {facts['numpy']}; "
        f"load average {load_start} at start, {load_before} before measuring (after generating), "
        f"{load_after} after.", "",
        f"Random bf16 Llama checkpoints (dim 1024, 16 heads, 4 KV heads, FFN {ffn_dim(PRESETS['medium'])}, "
        f"vocab 32000; only the depth differs) in Meta's layout ({N_SHARDS} model-parallel "
        "`consolidated.NN.pth` shards split as fairscale splits them) and as an HF directory (2 safetensors "
        "files + index), converted by `jora convert SRC OUT --dtype D --force` in a child process. Peak = the "
        f"child's `ru_maxrss` (wait4), median of {reps} runs; MiB throughout. Baselines (median of {reps}): "
        "*imports* = a child that only imports what the conversion imports (torch for Meta's layout only); "
        "*tiny* = `jora convert` of a 2-layer 64-wide model of the same layout. Above = peak minus the tiny "
        "baseline. Largest tensor = the 32000 x 1024 embedding / output head "
        f"({2 * largest:,} bytes in bf16, {4 * largest:,} in fp32). Anon/file = RssAnon/RssFile at "
        "the highest 5 ms `/proc` sample.", "",
        "| Baseline | layout | imports | tiny convert |", "|---|---|---:|---:|",
    ]
    for layout in ("meta", "hf"):
        b = baselines[layout]
        lines.append(f"| | {layout} | {b['imports'] / 1024:.0f} | {b['tiny'] / 1024:.0f} |")
    lines += [
        "",
        "| size | layers | params | layout | store dtype | checkpoint | largest tensor, bf16 / store dtype "
        "| peak RSS | above baseline | above / largest at store dtype | above / checkpoint | anon / file at peak "
        "| wall s |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        above = r["peak_kib"] * 1024 - baselines[r["layout"]]["tiny"] * 1024
        lines.append(
            f"| {r['size']} | {r['layers']} | {r['params'] / 1e6:.0f}M | {r['layout']} | {r['dtype']} "
            f"| {mib(r['ckpt_bytes'])} ({r['ckpt_bytes'] / 1e6:.0f} MB) "
            f"| {r['largest_src'] / MIB:.1f} / {r['largest_dst'] / MIB:.1f} "
            f"| {r['peak_kib'] / 1024:.0f} | {above / MIB:.0f} | {above / r['largest_dst']:.2f}x "
            f"| {above / r['ckpt_bytes']:.2f}x | {r['anon_kib'] / 1024:.0f} / {r['file_kib'] / 1024:.0f} "
            f"| {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def interpretation(rows: list[dict], baselines: dict) -> str:
    def above(r):
        return r["peak_kib"] * 1024 - baselines[r["layout"]]["tiny"] * 1024

    ratios = [above(r) / r["largest_dst"] for r in rows]
    worst = rows[ratios.index(max(ratios))]
    sizes = sorted({r["size"] for r in rows}, key=list(PRESETS).index)
    at_biggest = [above(r) / r["ckpt_bytes"] for r in rows if r["size"] == sizes[-1]]
    biggest = max(r["ckpt_bytes"] for r in rows)
    file_kib = worst["file_kib"] - baselines[worst["layout"]]["tiny_file"]
    text = (f"Peak RSS minus the tiny-convert baseline is {min(ratios):.1f}-{max(ratios):.1f}x the largest tensor "
            f"at the store's dtype ({min(above(r) for r in rows) / MIB:.0f}-{max(above(r) for r in rows) / MIB:.0f} "
            f"MiB; highest ratio: {worst['layout']} -> {worst['dtype']}, where {file_kib / 1024:.0f} MiB of it were "
            "file-backed pages of the memory-mapped source at the highest /proc sample), against "
            f"{min(at_biggest):.2f}-{max(at_biggest):.2f}x the checkpoint at {biggest / MIB:.0f} MiB.")
    if len(sizes) > 1:
        trend = []
        for layout in ("meta", "hf"):
            for dtype in ("bf16", "fp32"):
                series = [above(r) for s in sizes for r in rows
                          if r["size"] == s and r["layout"] == layout and r["dtype"] == dtype]
                if len(series) == len(sizes):
                    trend.append(f"{layout} -> {dtype} " + ", ".join(f"{v / MIB:.0f}" for v in series))
        text += (f" It does not grow with the model: from {sizes[0]} to {sizes[-1]} (same largest tensor, "
                 f"{PRESETS[sizes[0]]['n_layers']} to {PRESETS[sizes[-1]]['n_layers']} layers) it stays at "
                 + "; ".join(trend) + " MiB.")
    return text




# ---------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_generate":
        sys.path.insert(0, str(REPO))
        generate(Path(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jora-convert-memory"),
                        help="where the generated checkpoints are cached and the stores are written")
    parser.add_argument("--size", nargs="+", choices=[k for k in PRESETS if k != BASELINE_PRESET],
                        default=["medium"], help="checkpoint presets to measure (medium: ~580 MB)")
    parser.add_argument("--layouts", nargs="+", choices=["meta", "hf"], default=["meta", "hf"])
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--reps", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS}")
    args = parser.parse_args()

    command = shlex.join([os.path.relpath(sys.orig_argv[0], REPO) if os.path.isabs(sys.orig_argv[0])
                          else sys.orig_argv[0], *(os.path.relpath(a, REPO) if a == __file__ else a
                                                   for a in sys.orig_argv[1:])])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = loadavg()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    tiny_root = ensure_checkpoint(workdir, BASELINE_PRESET)
    roots = {size: ensure_checkpoint(workdir, size) for size in args.size}

    load_before = loadavg()
    baselines: dict[str, dict[str, float]] = {}
    for layout in args.layouts:
        imports = [measure([sys.executable, "-c", IMPORTS[layout]], logs / f"imports-{layout}.log")["maxrss_kib"]
                   for _ in range(args.reps)]
        tiny_runs = [run_convert(tiny_root / layout, workdir / "out" / f"tiny-{layout}", "fp32",
                                 logs / f"tiny-{layout}.log") for _ in range(args.reps)]
        tiny = [r["maxrss_kib"] for r in tiny_runs]
        baselines[layout] = {"imports": statistics.median(imports), "tiny": statistics.median(tiny),
                             "tiny_file": statistics.median(r["sample"].get("RssFile", 0) for r in tiny_runs)}
        print(f"baseline {layout}: imports {baselines[layout]['imports'] / 1024:.0f} MiB {imports}, "
              f"tiny convert {baselines[layout]['tiny'] / 1024:.0f} MiB {tiny}", file=sys.stderr, flush=True)

    rows = []
    for size in args.size:
        p = PRESETS[size]
        for layout in args.layouts:
            src = roots[size] / layout
            for dtype in args.dtypes:
                runs = [run_convert(src, workdir / "out" / f"{size}-{layout}-{dtype}", dtype,
                                    logs / f"{size}-{layout}-{dtype}-{i}.log") for i in range(args.reps)]
                peaks = [r["maxrss_kib"] for r in runs]
                median_run = sorted(runs, key=lambda r: r["maxrss_kib"])[len(runs) // 2]
                row = {
                    "size": size, "layers": p["n_layers"], "params": param_count(p), "layout": layout,
                    "dtype": dtype, "ckpt_bytes": checkpoint_bytes(src, layout),
                    "largest_src": 2 * largest_tensor_elements(p),
                    "largest_dst": (2 if dtype == "bf16" else 4) * largest_tensor_elements(p),
                    "peak_kib": statistics.median(peaks), "peaks_kib": peaks,
                    "wall_s": statistics.median(r["wall_s"] for r in runs),
                    "anon_kib": median_run["sample"].get("RssAnon", 0),
                    "file_kib": median_run["sample"].get("RssFile", 0),
                    "store_bytes": runs[0]["store_bytes"],
                }
                rows.append(row)
                print(f"{size} {layout} -> {dtype}: peaks {[round(k / 1024) for k in peaks]} MiB, "
                      f"walls {[round(r['wall_s'], 1) for r in runs]} s, store {mib(row['store_bytes'])} MiB, "
                      f"highest sample {median_run['sample']}", file=sys.stderr, flush=True)
    load_after = loadavg()

    (workdir / "results.json").write_text(json.dumps({"command": command, "started": started, "rows": rows,
                                                      "baselines": baselines}, indent=1))
    section = render(rows, baselines, machine_facts(), command, started, load_start, load_before, load_after,
                     args.reps)
    section += "\n" + interpretation(rows, baselines) + "\n"
    print(section)
    own = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss
    print(f"(this harness's own peak RSS: {own / 1024:.0f} MiB; it is folded into every child's ru_maxrss "
          "only where it is higher than the child's own)", file=sys.stderr)
    if args.write:
        write_section(SECTION, section)
        print(f"wrote the '{SECTION}' section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
