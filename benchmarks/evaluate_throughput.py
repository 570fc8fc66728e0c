"""Throughput of `jora evaluate`'s model work: examples per second, batched against one at a time.

For each model shape, random weights (Haiku's initialisers, seed 0; nothing read from disk) and a fixed
synthetic golden set of --examples requests: prompt lengths drawn uniformly from --prompt-min..--prompt-max
tokens (RAG-like: instruction plus retrieved context), references of 4-24 tokens plus an end token, token
ids uniform over the vocabulary (seed 0). Per request, what evaluate does per pass: a greedy answer of
exactly --new-tokens tokens (no stop id, so every configuration does the same work) and the teacher-forced
loss of the reference. Configurations:

* batched   jora_model.evaluation: BatchedGreedy + ResponseScorer, --batch-size prompts at a time after
            sorting by length (evaluate's default: 8), one compiled loop per bucket shape;
* single    the same code with batch size 1 (one prompt at a time, still one compiled loop per shape);
* generator (generation only, for reference) jora_model.model.generate.Generator, `jora generate`'s
            batch-1 generator: one jitted call per new token from Python; plus the scorer at batch 1.

Each configuration runs once untimed (compiling every shape it needs; that time is reported apart), then
--repeats timed rounds run every configuration once each, interleaved; reported: the median examples/s,
its spread, and batched / single. Checks
before timing that batched and single give the same answer ids (greedy, float32).

    .venv/bin/python benchmarks/evaluate_throughput.py --write

Shapes: `demo` = data/tiny_llama.json (the demo's model: dim 128, 2 layers, 4 heads, 2 KV heads,
vocabulary 1000), `small` = `jora plan --preset small` (dim 512, 8 layers, vocabulary 32000).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import loadavg, write_section  # noqa: E402  (benchmarks/ is on sys.path)

SECTION = "## Evaluate throughput"
REPO = Path(__file__).resolve().parents[1]


def model_config(shape: str):
    from jora_model.model.config import preset, read_meta_params

    if shape == "demo":
        import json

        vocab = json.loads((REPO / "data" / "tiny_llama.json").read_text())["tokenizer_vocab_size"]
        return read_meta_params(REPO / "data" / "tiny_llama.json", vocab_size=vocab)
    return preset(shape)


def random_model(config):
    import jax
    import numpy as np

    from jora_model.api import LoadedModel
    from jora_model.model.llama import ModelOptions, transformed

    params = transformed(config, ModelOptions()).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
    return LoadedModel(config, params, "float32")


def golden(config, args):
    import numpy as np

    from jora_model.evaluation.golden import Request

    rng = np.random.default_rng(0)
    out = []
    for _ in range(args.examples):
        prompt = rng.integers(3, config.vocab_size, rng.integers(args.prompt_min, args.prompt_max + 1))
        reply = rng.integers(3, config.vocab_size, rng.integers(4, 25) + 1)
        out.append(Request(np.concatenate([[1], prompt]).astype(np.int32), reply.astype(np.int32)))
    return out


def runner(kind: str, model, requests, args):
    """A function doing one pass over `requests`; returns the answers."""
    from jora_model.evaluation.greedy import BatchedGreedy
    from jora_model.evaluation.scoring import ResponseScorer
    from jora_model.model.generate import Generator, SamplingSettings

    size = args.batch_size if kind == "batched" else 1
    scorer = ResponseScorer(model, size)
    if kind == "generator":
        generator, settings = Generator(model), SamplingSettings(max_new_tokens=args.new_tokens)

        def generate():
            return [generator.generate(r.prompt.tolist(), settings, eos_id=None) for r in requests]
    else:
        greedy = BatchedGreedy(model, size)

        def generate():
            return greedy.generate([r.prompt for r in requests], args.new_tokens, [])

    def one_pass():
        answers = generate()
        scorer.score([r.teacher_forced() for r in requests])
        return answers

    return one_pass


def measure(shape: str, args) -> dict:
    """Every configuration compiled by one untimed pass, then the timed passes interleaved (ABCABC...,
    the order reversed every other round), so a change in the machine's load hits all of them alike."""
    config = model_config(shape)
    model, requests = random_model(config), golden(config, args)
    row = {"shape": shape, "config": config, "kinds": {}}
    passes, answers, times = {}, {}, {kind: [] for kind in args.kinds}
    for kind in args.kinds:
        passes[kind] = runner(kind, model, requests, args)
        started = time.perf_counter()
        answers[kind] = passes[kind]()
        row["kinds"][kind] = {"first_s": time.perf_counter() - started}
    for round_ in range(args.repeats):
        for kind in (args.kinds if round_ % 2 == 0 else args.kinds[::-1]):
            started = time.perf_counter()
            passes[kind]()
            times[kind].append(time.perf_counter() - started)
    for kind in args.kinds:
        rates = sorted(len(requests) / t for t in times[kind])
        row["kinds"][kind] |= {"median": statistics.median(rates), "low": rates[0], "high": rates[-1]}
        print(shape, kind, row["kinds"][kind], f"load {loadavg()}", flush=True)
    if "batched" in answers and "single" in answers:
        row["same_answers"] = answers["batched"] == answers["single"]
    return row


def render(rows: list[dict], args, started: str, load_start: str) -> str:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("jax", "jaxlib"))
    lines = [SECTION, "", f"Measured {started} with", "", "```",
             ".venv/bin/python benchmarks/evaluate_throughput.py " + " ".join(map(shlex.quote, sys.argv[1:])),
             "```", "",
             f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
             f"{versions}; float32. Load average {load_start} at start, {loadavg()} at the end. {args.examples} "
             f"requests, prompts of {args.prompt_min}-{args.prompt_max} tokens, {args.new_tokens} new tokens each "
             f"(no stop), references of 5-25 tokens; median of {args.repeats} timed passes after one untimed "
             "(compiling) pass, the configurations' passes interleaved. One pass = greedy answers + "
             "teacher-forced losses, as evaluate does per golden set (it does two passes: with and without the "
             "context).", "",
             "| model | configuration | examples/s (median) | min-max | first pass, s (compiles) |",
             "|---|---|---:|---|---:|"]
    for row in rows:
        c = row["config"]
        name = f"{row['shape']} (dim {c.dim}, {c.n_layers} layers, vocab {c.vocab_size})"
        for kind, k in row["kinds"].items():
            label = {"batched": f"batched, {args.batch_size} at a time", "single": "one at a time (batch 1)",
                     "generator": "Generator (jora generate), one at a time"}[kind]
            lines.append(f"| {name} | {label} | {k['median']:.2f} | {k['low']:.2f}-{k['high']:.2f} | "
                         f"{k['first_s']:.1f} |")
    lines.append("")
    for row in rows:
        k = row["kinds"]
        if "batched" in k and "single" in k:
            ratio = k["batched"]["median"] / k["single"]["median"]
            lines.append(f"{row['shape']}: batched / one at a time = **{ratio:.2f}x**"
                         + (f", batched / Generator = {k['batched']['median'] / k['generator']['median']:.2f}x"
                            if "generator" in k else "")
                         + f"; batched and one-at-a-time answers identical: {row.get('same_answers')}.")
    if args.notes:
        lines += ["", args.notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["demo", "small"])
    parser.add_argument("--kinds", nargs="+", default=["batched", "single", "generator"],
                        choices=["batched", "single", "generator"])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--prompt-min", type=int, default=60)
    parser.add_argument("--prompt-max", type=int, default=250)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help=f"write the section {SECTION!r} of RESULTS.md")
    parser.add_argument("--notes", default="", help="a paragraph added under the table")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = loadavg()
    rows = [measure(shape, args) for shape in args.shapes]
    section = render(rows, args, started, load_start)
    print(section)
    if args.write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
