"""Throughput of `jora tokenize` against the usual Hugging Face way of doing the same work.

Generates (once, cached in --workdir) a deterministic RAG-like Alpaca set: an instruction of 10-30
words, an `input` of 1-3 retrieved passages of 100-400 words each (empty in about a quarter of the
records; 2% of the rest get 4-6 passages, long enough to be cut to max_seq_len) and an output of 20-120 words, in English-like text (a few hundred common English words
plus tens of thousands of made-up words with Zipf frequencies, numbers, punctuation, the odd
non-ASCII character). It also trains, once, a Llama-like SentencePiece tokenizer on part of that text
(BPE, byte fallback, unk/bos/eos = 0/1/2, identity normalisation, whitespace kept: Llama's settings,
via pipeline.demo_tokenizer).

Then it times, each in a fresh child process, alternating which goes first from run to run:

* A  `stages.tokenize.tokenize(data, out, tokenizer, TokenizeSettings(max_seq_len=2000), workers=2,
     force=True)`: read + validate the JSON, tokenize in 2 spawned SentencePiece workers, cut long
     prompts, split train/val, write Arrow shards and stats.json;
* B  the usual HF way: `datasets.load_dataset("json", ...)` (into a fresh cache directory, so the
     JSON -> Arrow conversion is paid every run), `transformers.LlamaTokenizerFast` converted offline
     from the same tokenizer.model (once, saved as tokenizer.json; needs protobuf), `.map(fn, batched=True, num_proc=2, remove_columns=...)` where fn renders
     the same Alpaca prompt, tokenizes prompt and response (no special tokens), builds
     input_ids = [bos] + prompt + response + [eos], labels (-100 over the prompt) and attention_mask,
     and truncates the prompt's end when the row would pass 2000 tokens; then `save_to_disk`.
     B does no validation and no train/val split, so it does strictly less work than A.
* B1 (with --unbatched) the same with batched=False, the form many tutorials show.

Timed: the stage call / from load_dataset to the end of save_to_disk, inside the child, after its
imports (importing datasets + transformers takes seconds and is not charged to B). Tokens = the
input_ids written, counted from the output afterwards. Reported: median over --runs of examples/s and
tokens/s, the ratio A/B, the load average around every run, and a check that A and B wrote the same
number of examples and nearly the same tokens (identical ids for rows neither of them cut).

    .venv/bin/python benchmarks/tokenize_throughput.py --records 20000 --runs 5 --unbatched --profile --write

--profile adds a breakdown of A's time (SentencePiece / JSON / Arrow / the rest of the Python, plus the
pickling and worker start-up the 2-worker run adds). --render-only re-renders the section from the
last run's WORKDIR/results.json (e.g. with new --notes).

With --tokenizer llama3 (section "Llama 3: tokenize throughput") the tokenizer is Llama-3-like instead,
built offline: a byte-level BPE trained by the `tokenizers` library on all the records with Meta's
pre-tokenisation (Meta's split regex, then ByteLevel without its own regex), at most --vocab (128000)
tokens, written as Meta's tiktoken ranks file (A reads it: jora's TiktokenTokenizer) and, through
transformers' TikTokenConverter, as an HF tokenizer.json + tokenizer_config.json with Meta's 256 special
tokens (B loads it with AutoTokenizer: PreTrainedTokenizerFast, as Llama 3's HF repositories do). Every
text of every record must encode to the same ids with both before anything is timed.

    .venv/bin/python benchmarks/tokenize_throughput.py --tokenizer llama3 --records 20000 --runs 5 --profile --write

Needs `datasets` (pip install -e '.[bench]'), and `protobuf` for transformers to convert the SentencePiece
tokenizer.model (benchmark-only: pip install datasets protobuf); --tokenizer llama3 needs tiktoken.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from _report import RESULTS, loadavg, write_section  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Tokenize throughput"
SECTION_LLAMA3 = "## Llama 3: tokenize throughput"
GEN_VERSION = "rag-2"
MAX_SEQ_LEN = 2000
WORKERS = 2

# --- the data set ------------------------------------------------------------------------------

COMMON = """the of and to a in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if so no will more can its
what about who them some could him into than time only other new also these two may first then any
like our over such should very after most made well way years many even because those through where
much before must back between each under used being same another while last might great since against
three without both here during still found however every different number part small often large
system data model information people world state public general process research result results
national water development government company study group service market health include including
based local known important level support report between form order across given within several
example history effect area policy value need program case common power change control design high
during early long major open real second third following provide provided production period
language text document source question answer response training learning network method methods
analysis project product energy city county river school university center century region population
students percent record records season team league game games album song band film series episode
published released located building station road line species family genus disease treatment patient
cells protein temperature pressure surface material structure function test tests sample samples
""".split()
SYLLABLES = """ba be bi bo bu ca ce ci co cu da de di do du fa fe fi fo ga ge gi go gu ha he hi ho la le
li lo lu ma me mi mo mu na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va
ve vi vo za ze zo ar er ir or ur an en in on un al el il ol ul ex ph th st tr pl gr br cr dr str nd nt
ng ck sh ch qu wh tion ment ness ity ous ive able ing ed ly er est ism ist ure ance ence""".split()
RARE = ["café", "naïve", "résumé", "façade", "Zürich", "São", "Kraków", "Ångström", "—", "–", "“quoted”",
        "‘single’", "…", "°C", "±", "µm", "€", "£", "×", "→", "日本", "Москва", "λ", "Δ", "🙂"]
LEXICON_SIZE = 30000


def _lexicon(rng) -> tuple[list[str], "object"]:
    import numpy as np

    words, seen = list(dict.fromkeys(COMMON)), set(COMMON)
    while len(words) < LEXICON_SIZE:
        n = int(rng.choice([1, 2, 2, 3, 3, 3, 4, 4, 5]))
        w = "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n))
        if w not in seen:
            seen.add(w)
            words.append(w)
    ranks = np.arange(1, len(words) + 1)
    p = 1.0 / (ranks + 2.7) ** 1.07  # Zipf-Mandelbrot, as in natural text
    return words, p / p.sum()


class _Writer:
    """English-ish sentences from the lexicon: capitals, commas, numbers, names, rare characters."""

    def __init__(self, seed: int):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.words, self.p = _lexicon(self.rng)
        self.cum = np.cumsum(self.p)

    def sentence(self, n: int) -> str:
        rng = self.rng
        idx = self.cum.searchsorted(rng.random(n))
        idx[idx >= len(self.words)] = len(self.words) - 1
        extras = rng.random(n)
        out = []
        for k, (i, x) in enumerate(zip(idx.tolist(), extras.tolist())):
            w = self.words[i]
            if x < 0.02:
                w = str(int(rng.integers(1, 3000))) if x < 0.012 else f"{rng.random() * 100:.1f}%"
            elif x < 0.05:
                w = w.capitalize()  # a name
            elif x < 0.053:
                w = RARE[int(rng.integers(0, len(RARE)))]
            if k == 0:
                w = w[:1].upper() + w[1:]
            elif x > 0.93:
                w += ","
            elif x > 0.925:
                w = f"({w})"
            out.append(w)
        return " ".join(out) + ("?" if n % 11 == 0 else ".")

    def text(self, words: int) -> str:
        parts, left = [], words
        while left > 0:
            n = min(left, int(self.rng.integers(6, 28)))
            parts.append(self.sentence(n))
            left -= n
        return " ".join(parts)


def generate(path: Path, records: int, seed: int = 1234) -> None:
    w = _Writer(seed)
    rng = w.rng
    out = []
    for i in range(records):
        instruction = w.text(int(rng.integers(10, 31)))
        if rng.random() < 0.25:
            context = ""
        else:
            passages = []
            # 1-3 passages; 2% of records retrieve 4-6, enough to pass max_seq_len and be cut
            n = int(rng.integers(4, 7)) if rng.random() < 0.02 else int(rng.integers(1, 4))
            for j in range(n):
                title = w.sentence(int(rng.integers(2, 7))).rstrip(".?")
                passages.append(f"[{j + 1}] {title}\n{w.text(int(rng.integers(100, 401)))}")
            context = "\n\n".join(passages)
        output = w.text(int(rng.integers(20, 121)))
        out.append({"instruction": instruction, "input": context, "output": output})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, ensure_ascii=False, indent=1))
    tmp.rename(path)


def ensure_data(workdir: Path, records: int) -> Path:
    path = workdir / f"alpaca-{GEN_VERSION}-{records}.json"
    if not path.exists():
        t = time.monotonic()
        generate(path, records)
        print(f"generated {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t:.1f} s",
              file=sys.stderr, flush=True)
    return path


def ensure_tokenizer(workdir: Path, data: Path, vocab: int, train_records: int) -> Path:
    path = workdir / f"tokenizer-{GEN_VERSION}-{vocab}.model"
    if not path.exists():
        sys.path.insert(0, str(REPO))
        from pipeline.demo_tokenizer import train_llama_tokenizer

        records = json.loads(data.read_text())[:train_records]
        texts = [t for r in records for t in (r["instruction"], r["input"], r["output"]) if t]
        t = time.monotonic()
        train_llama_tokenizer(texts, path, vocab)
        print(f"trained {path} in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    return path


# --- a Llama-3-like tokenizer, built offline ---------------------------------------------------

def train_llama3_ranks(texts: list[str], vocab: int) -> dict[bytes, int]:
    """A byte-level BPE trained by the `tokenizers` library with Meta's Llama 3 pre-tokenisation (Meta's
    split regex, then bytes as ByteLevel's 256 characters, no ByteLevel regex of its own), as tiktoken
    ranks: the 256 single bytes first, then each merged token in the order the trainer made it. At most
    `vocab` ranks; fewer when the corpus runs out of pairs to merge."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    sys.path.insert(0, str(REPO))
    from jora_model.data.tiktoken_file import PATTERN

    lib = Tokenizer(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lib.train_from_iterator(texts, trainer)
    decode = {c: b for b, c in bytes_to_unicode().items()}
    by_id = sorted(lib.get_vocab().items(), key=lambda kv: kv[1])
    ranks = {bytes(decode[c] for c in token): i for i, (token, _) in enumerate(by_id)}
    assert len(ranks) == len(by_id) and all(bytes([b]) in ranks for b in range(256))
    return ranks


def write_llama3_files(ranks: dict[bytes, int], path: Path, hf_dir: Path) -> None:
    """`path`: Meta's tiktoken format (`base64(token) rank` per line, as in Llama 3's tokenizer.model);
    `hf_dir`: what an HF Llama 3 repository ships, tokenizer.json + tokenizer_config.json, made from the
    ranks by transformers' own TikTokenConverter (the converter behind HF's Llama 3 tokenizer.json: BPE with
    ignore_merges, the Split pre-tokenizer with Meta's pattern + ByteLevel(use_regex=False)) and Meta's
    256 special tokens after the ranks."""
    import base64

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    sys.path.insert(0, str(REPO))
    from jora_model.data.tiktoken_file import BOS, EOS, PATTERN, special_tokens

    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])))
    lib = TikTokenConverter(vocab_file=str(tmp), pattern=PATTERN, extra_special_tokens=special_tokens()).converted()
    assert lib.token_to_id(BOS) == len(ranks) and lib.get_vocab_size() == len(ranks) + 256
    hf_dir.mkdir(exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=lib, bos_token=BOS, eos_token=EOS,
                            model_max_length=131072).save_pretrained(str(hf_dir))
    tmp.rename(path)


def ensure_llama3_tokenizer(workdir: Path, data: Path, vocab: int, train_records: int) -> Path:
    path = workdir / f"llama3-{GEN_VERSION}-{vocab}-{train_records}.model"
    if not path.exists():
        records = json.loads(data.read_text())[:train_records]
        texts = [t for r in records for t in (r["instruction"], r["input"], r["output"]) if t]
        t = time.monotonic()
        ranks = train_llama3_ranks(texts, vocab)
        write_llama3_files(ranks, path, _hf_dir(path))
        print(f"trained {path} ({len(ranks)} ranks) in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    return path


def _hf_dir(tokenizer: Path) -> Path:
    return tokenizer.parent / f"{tokenizer.stem}-hf"


def _is_tiktoken(tokenizer: Path) -> bool:
    return tokenizer.name.startswith("llama3-")


# --- the two contenders, each run in a child ---------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children (both pools join their workers
    before returning, so the workers' CPU is in here once the timed call is over)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_ours(data: Path, out: Path, tokenizer: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from stages.tokenize import TokenizeSettings, tokenize

    cpu, t = cpu_seconds(), time.perf_counter()
    result = tokenize(data, out, tokenizer, TokenizeSettings(max_seq_len=MAX_SEQ_LEN), workers=WORKERS, force=True)
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    facts = result.manifest["facts"]
    splits = facts["splits"].values()
    return {"seconds": seconds, "cpu": cpu, "examples": facts["written"], "tokens": sum(s["tokens"] for s in splits),
            "cut": facts["cut"]["examples"], "dropped": sum(facts["dropped"].values())}


def _hf_tokenizer(tokenizer: Path):
    """`LlamaTokenizerFast` for the SentencePiece model, offline: converted from the .model once (the
    conversion needs `protobuf`) and saved beside it as an HF tokenizer directory, which later loads are
    read from, as from a model repository that ships tokenizer.json."""
    if _is_tiktoken(tokenizer):
        # Llama 3's HF repositories ship tokenizer.json and load as PreTrainedTokenizerFast (AutoTokenizer)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(_hf_dir(tokenizer)))
    from transformers import LlamaTokenizerFast

    directory = _hf_dir(tokenizer)
    if not (directory / "tokenizer.json").exists():
        directory.mkdir(exist_ok=True)
        shutil.copyfile(tokenizer, directory / "tokenizer.model")
        LlamaTokenizerFast.from_pretrained(str(directory), legacy=True).save_pretrained(str(directory))
    return LlamaTokenizerFast.from_pretrained(str(directory), legacy=True)


def child_hf(data: Path, out: Path, tokenizer: Path, batched: bool, cache: Path) -> dict:
    import datasets

    datasets.disable_progress_bars()
    tok = _hf_tokenizer(tokenizer)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    with_input, without_input = _templates()

    def prompt_of(instruction: str, context: str) -> str:
        if context:
            return with_input.format(instruction=instruction, input=context)
        return without_input.format(instruction=instruction)

    def row(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        budget = MAX_SEQ_LEN - 2 - len(response)
        prompt = prompt[:max(budget, 0)]
        ids = [bos, *prompt, *response, eos]
        return ids, [-100] * (1 + len(prompt)) + [*response, eos]

    def fn_batched(batch: dict) -> dict:
        prompts = [prompt_of(i or "", c or "") for i, c in zip(batch["instruction"], batch["input"])]
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tok([o or "" for o in batch["output"]], add_special_tokens=False)["input_ids"]
        rows = [row(p, r) for p, r in zip(p_ids, r_ids)]
        return {"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows],
                "attention_mask": [[1] * len(ids) for ids, _ in rows]}

    def fn_single(example: dict) -> dict:
        p = tok(prompt_of(example["instruction"] or "", example["input"] or ""), add_special_tokens=False)["input_ids"]
        r = tok(example["output"] or "", add_special_tokens=False)["input_ids"]
        ids, labels = row(p, r)
        return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}

    cpu, t = cpu_seconds(), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    ds = ds.map(fn_batched if batched else fn_single, batched=batched, num_proc=WORKERS,
                remove_columns=ds.column_names)
    ds.save_to_disk(str(out))
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    lengths = [len(x) for x in datasets.load_from_disk(str(out)).with_format("arrow")["input_ids"].to_pylist()]
    return {"seconds": seconds, "cpu": cpu, "examples": len(lengths), "tokens": sum(lengths),
            "cut": None, "dropped": None}


def _templates() -> tuple[str, str]:
    sys.path.insert(0, str(REPO))
    from jora_model.data.alpaca import TEMPLATES

    return TEMPLATES["alpaca"]


def child_profile(data: Path, out: Path, tokenizer: Path) -> dict:
    """Where A's time goes: the stage with workers=1 (all in this process) under cProfile, split into
    SentencePiece (the C++ encode calls), reading the JSON, Arrow writing and the rest of the Python;
    then what the 2-worker run adds: pickling the tasks and results between processes (timed here on
    the same data: the dumps only, since timing the loads would mean unpickling) and starting the spawned
    workers (ready to take a task)."""
    import cProfile
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    import pickle
    import pstats

    sys.path.insert(0, str(REPO))
    from stages import tokenize as stage
    from jora_model.data.alpaca import read_records

    profile = cProfile.Profile(time.process_time)  # CPU time: other jobs on the machine do not count
    cpu = cpu_seconds()
    profile.enable()
    stage.tokenize(data, out, tokenizer, stage.TokenizeSettings(max_seq_len=MAX_SEQ_LEN), workers=1, force=True)
    profile.disable()
    cpu = cpu_seconds() - cpu
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values())

    def cum(file_part: str, name: str) -> float:
        return sum(v[3] for (f, _, n), v in stats.items() if file_part in f and n == name)

    def native_encoder(f: str, n: str) -> bool:  # SentencePiece's, or tiktoken's Rust CoreBPE
        return "sentencepiece" in f or "sentencepiece" in n or "CoreBPE" in n

    sp = sum(v[2] for (f, _, n), v in stats.items() if native_encoder(f, n))
    tiktoken_calls = sum(v[1] for (f, _, n), v in stats.items() if "CoreBPE" in n and "encode" in n)
    encode = cum("tokenizer.py", "encode_array")  # the word cache, SentencePiece on new words included
    sp_calls = sum(v[1] for (f, _, n), v in stats.items() if "sentencepiece" in f and n == "EncodeAsIds")
    read = cum("alpaca.py", "read_records")
    arrow = sum(cum(f, n) for f in ("data.py", "shards.py") for n in ("add", "close"))  # ShardWriter's file, then and now
    ranks_s = cum("tokenizer_files.py", "read_tiktoken_ranks")  # tiktoken file: parsing the ranks (parent + worker)
    cut = cum("alpaca.py", "_cut")

    import inspect

    records = read_records(data)
    settings = stage.TokenizeSettings(max_seq_len=MAX_SEQ_LEN)
    # the stage's worker protocol: (path) + (chunk, max_len, template name) before the prompt templates
    # (issue 21), (path, template, system) + (chunk, max_len) since
    with_templates = len(inspect.signature(stage._init_worker).parameters) == 3
    init = (str(tokenizer), settings.template, settings.system) if with_templates else (str(tokenizer),)
    pairs = list(enumerate(records))
    tasks = [(pairs[k:k + stage._CHUNK], MAX_SEQ_LEN) + (() if with_templates else ("alpaca",))
             for k in range(0, len(records), stage._CHUNK)]
    stage._init_worker(*init)
    results = [stage._tokenize_chunk(task) for task in tasks]
    t = time.process_time()
    blobs = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in tasks + results]
    dumps = time.process_time() - t
    t, c = time.perf_counter(), cpu_seconds()
    # the same executor the stage uses
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"),
                             initializer=stage._init_worker, initargs=init) as pool:
        list(pool.map(abs, range(WORKERS)))
        ready = time.perf_counter() - t
    start_cpu = cpu_seconds() - c
    return {"profiled_s": total, "cpu_s": cpu, "sentencepiece_s": sp, "encode_s": encode, "sentencepiece_calls": sp_calls,
            "tiktoken_calls": tiktoken_calls, "read_ranks_s": ranks_s,
            "read_json_s": read, "arrow_s": arrow,
            "cut_s": cut, "other_s": total - sp - read - arrow, "pickle_dumps_s": dumps,
            "pickled_mb": sum(map(len, blobs)) / 1e6, "spawn_ready_s": ready, "spawn_cpu_s": start_cpu}


def child(args) -> None:
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    if args.child == "P":
        result = child_profile(Path(args.data), out, Path(args.tokenizer_file))
    elif args.child == "A":
        result = child_ours(Path(args.data), out, Path(args.tokenizer_file))
    else:
        cache = out.parent / f"{out.name}-hfcache"
        shutil.rmtree(cache, ignore_errors=True)
        result = child_hf(Path(args.data), out, Path(args.tokenizer_file), args.child == "B", cache)
        shutil.rmtree(cache, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, data: Path, tokenizer: Path, out: Path, log: Path) -> dict:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    load = loadavg()
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(data), "--tokenizer-file", str(tokenizer),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed (rc {proc.returncode}); see {log}\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"load_before": load}


# --- checking that A and B did the same work ---------------------------------------------------

def compare_outputs(a_dir: Path, b_dir: Path) -> dict:
    """Same ids? A's rows (both splits, by example_id) against B's rows (in record order)."""
    import datasets
    import pyarrow as pa

    a: dict[int, list[int]] = {}
    for split in ("train", "val"):
        for path in sorted((a_dir / split).glob("part-*.arrow")):
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            for eid, ids in zip(table.column("example_id").to_pylist(), table.column("input_ids").to_pylist()):
                a[eid] = ids
    b = datasets.load_from_disk(str(b_dir)).with_format("arrow")["input_ids"].to_pylist()
    same = differ = 0
    first_diff = None
    for eid, ids in a.items():
        if ids == b[eid]:
            same += 1
        else:
            differ += 1
            first_diff = first_diff if first_diff is not None else eid
    long_b = sum(1 for ids in b if len(ids) >= MAX_SEQ_LEN - 1)
    return {"rows_a": len(a), "rows_b": len(b), "identical": same, "differ": differ, "first_diff": first_diff,
            "b_rows_at_limit": long_b}


def check_tokenizers(tokenizer: Path, data: Path, n: int = 300) -> dict:
    """Encode the first n records' texts (every record's, for the tiktoken file) with both tokenizers: the
    number of identical id lists."""
    sys.path.insert(0, str(REPO))
    from jora_model.data.tokenizer import load_tokenizer

    ours, hf = load_tokenizer(tokenizer), _hf_tokenizer(tokenizer)
    records = json.loads(data.read_text())
    records = records if _is_tiktoken(tokenizer) else records[:n]
    texts = [t for r in records for t in (r["instruction"], r["input"], r["output"]) if t]
    if _is_tiktoken(tokenizer):
        a, b = ours.encode_batch(texts), hf(texts, add_special_tokens=False)["input_ids"]
    else:
        a, b = [ours.encode(t) for t in texts], [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    same = sum(x == y for x, y in zip(a, b))
    return {"texts": len(texts), "records": len(records), "identical": same, "vocab": ours.vocab_size,
            "hf_class": type(hf).__name__, "bos": ours.bos_id, "eos": ours.eos_id,
            "hf_bos_eos": [hf.bos_token_id, hf.eos_token_id],
            "tokens_per_word": sum(map(len, a)) / sum(len(t.split()) for t in texts)}


# --- reporting ----------------------------------------------------------------------------------


def machine_facts() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    versions = {}
    for name in ("sentencepiece", "tiktoken", "pyarrow", "datasets", "transformers", "tokenizers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model.group(1).strip() if model else platform.processor(),
            "kernel": platform.release(), "python": platform.python_version(), **versions}


NAMES = {"A": "A: `jora tokenize` (stages.tokenize, 2 workers)",
         "B": "B: `datasets.map(batched=True, num_proc=2)` + LlamaTokenizerFast",
         "B1": "B1: `datasets.map(batched=False, num_proc=2)` + LlamaTokenizerFast"}


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for kind, rs in runs.items():
        out[kind] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "ex_s": statistics.median(r["examples"] / r["seconds"] for r in rs),
            "tok_s": statistics.median(r["tokens"] / r["seconds"] for r in rs),
            "cpu": statistics.median(r["cpu"] for r in rs),
            "tok_cpu_s": statistics.median(r["tokens"] / r["cpu"] for r in rs),
            "examples": rs[0]["examples"], "tokens": rs[0]["tokens"],
            "all_seconds": [round(r["seconds"], 2) for r in rs],
        }
    return out


def render(summary: dict, runs: dict, facts: dict, meta: dict) -> str:
    a = summary["A"]
    lines = [
        SECTION, "",
        f"Measured {meta['started']} with", "", "```", meta["command"], "```", "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), Linux {facts['kernel']}, Python {facts['python']}, "
        f"sentencepiece {facts['sentencepiece']}, pyarrow {facts['pyarrow']}, datasets {facts['datasets']}, "
        f"transformers {facts['transformers']}, tokenizers {facts['tokenizers']}. Shared, noisy machine: the "
        f"runs alternate A and B (the order flips every run) and medians of {meta['runs']} runs are quoted. "
        f"Load average (1/5/15 min) {meta['load_start']} at start, {meta['load_end']} at the end; before "
        "each run: " + "; ".join(f"{k} " + ", ".join(r["load_before"].split()[0] for r in rs)
                                  for k, rs in runs.items()) + " (1 min).", "",
        f"Data: {meta['records']} generated RAG-like Alpaca records ({meta['data_mb']:.1f} MB of JSON; "
        "instruction 10-30 words, input 1-3 retrieved passages of 100-400 words each (4-6 in 2%, "
        f"so that some prompts must be cut) or empty in ~25%, output 20-120 words). Tokenizer: SentencePiece BPE trained on the first {meta['train_records']} "
        f"records with Llama's settings (byte fallback, unk/bos/eos 0/1/2, identity normalisation), "
        f"{meta['tok']['vocab']} pieces, {meta['tok']['tokens_per_word']:.2f} tokens per word; "
        f"`LlamaTokenizerFast.from_pretrained(dir, legacy=True)` converted offline from the same file encodes "
        f"{meta['tok']['identical']}/{meta['tok']['texts']} sample texts to identical ids. max_seq_len "
        f"{MAX_SEQ_LEN}, {WORKERS} worker processes on both sides.", "",
        "A = `stages.tokenize.tokenize(..., TokenizeSettings(max_seq_len=2000), workers=2, force=True)`: "
        "JSON -> validated records -> SentencePiece with the per-word cache (jora_model/tokenizer.py) in 2 "
        "spawned workers -> prompt cutting -> train/val "
        "Arrow shards + stats.json. B = `load_dataset(\"json\")` (fresh cache dir each run) -> "
        "`.map(fn, num_proc=2, remove_columns=...)` (fn: same Alpaca prompt, prompt and response "
        "tokenized without special tokens, `[bos]+prompt+response+[eos]`, labels -100 over the prompt, "
        "attention_mask, the prompt's end truncated to fit) -> `save_to_disk`; no validation and no "
        "train/val split. Both timed end to end from the JSON file to Arrow on disk, in a fresh child "
        "process, after imports. Tokens = input_ids written. CPU s = user + system time of the child and "
        "its worker processes over the timed call (getrusage): less sensitive than wall time to the other "
        "jobs on a shared machine, and on 2 cores wall time cannot drop below half of it.", "",
        "| | median s | examples/s | tokens/s | runs (s) | CPU s (all processes) | tokens per CPU s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for kind, s in summary.items():
        lines.append(f"| {NAMES[kind]} | {s['seconds']:.2f} | {s['ex_s']:,.0f} | {s['tok_s']:,.0f} "
                     f"| {', '.join(str(x) for x in s['all_seconds'])} | {s['cpu']:.1f} | {s['tok_cpu_s']:,.0f} |")
    lines.append("")
    for kind in summary:
        if kind != "A":
            s = summary[kind]
            lines.append(f"A / {kind}: {a['ex_s'] / s['ex_s']:.2f}x examples/s, {a['tok_s'] / s['tok_s']:.2f}x "
                         f"tokens/s (goal: at least 2x); {s['cpu'] / a['cpu']:.2f}x less CPU time.")
    c = meta["compare"]
    b = summary["B"]
    lines += ["",
              f"Same work: A wrote {a['examples']} examples / {a['tokens']:,} tokens ({meta['a_cut']} prompts cut, "
              f"{meta['a_dropped']} dropped), B {b['examples']} / {b['tokens']:,} "
              f"({100 * (b['tokens'] - a['tokens']) / a['tokens']:+.3f}% tokens); {c['identical']} of "
              f"{c['rows_a']} rows have identical input_ids in A and B, {c['differ']} differ (rows whose "
              "prompt was cut: A cuts the retrieved context at a piece boundary and re-encodes, B truncates "
              "the prompt's token list, dropping the template's tail).", ""]
    p = meta.get("profile")
    if p:
        sp = p["sentencepiece_s"]
        lines += [
            f"Where A's time goes (`--profile`: the stage with workers=1, all in one process, under cProfile "
            f"with a CPU-time clock: {p['profiled_s']:.1f} CPU s profiled, {p['cpu_s']:.1f} CPU s with the profiler's "
            f"own cost; load {p['load_before'].split()[0]}):", "",
            "| part | CPU s | share |", "|---|---:|---:|",
            f"| SentencePiece encode (the C++ `Encode` calls: {p.get('sentencepiece_calls', 0):,} of them, one per "
            f"word not yet in the per-word cache, plus the offsets and re-encoding when cutting the "
            f"{meta['a_cut']} long prompts; `_cut` takes {p['cut_s']:.2f} s) "
            f"| {sp:.2f} | {sp / p['profiled_s']:.0%} |",
            f"| the per-word cache (`Tokenizer.encode_array` less the SentencePiece calls: splitting into words, "
            f"dict lookups, joining the cached int32 bytes) | {p.get('encode_s', sp) - sp:.2f} "
            f"| {(p.get('encode_s', sp) - sp) / p['profiled_s']:.0%} |",
            f"| reading + parsing the JSON (`read_records`) | {p['read_json_s']:.2f} "
            f"| {p['read_json_s'] / p['profiled_s']:.0%} |",
            f"| Arrow shards (`ShardWriter.add` + `close`) | {p['arrow_s']:.2f} | {p['arrow_s'] / p['profiled_s']:.0%} |",
            f"| the rest of the Python (prompt rendering, `tokenize_record`, stats, input "
            f"hashing) | {p['other_s'] - (p.get('encode_s', p['sentencepiece_s']) - p['sentencepiece_s']):.2f} "
            f"| {(p['other_s'] - (p.get('encode_s', p['sentencepiece_s']) - p['sentencepiece_s'])) / p['profiled_s']:.0%} |", "",
            f"Added by the 2-worker run: pickling tasks and results between processes "
            f"({p['pickled_mb']:.0f} MB, the per-record `Example`s with their numpy arrays): "
            f"{p['pickle_dumps_s']:.2f} s dumps (in the workers)"
            + (f" + {p['pickle_loads_s']:.2f} s loads (in the parent)" if "pickle_loads_s" in p else "")
            + "; "
            f"starting the 2 spawned workers (interpreter, numpy, sentencepiece, the model): "
            f"{p['spawn_ready_s']:.2f} s until both take a task, {p['spawn_cpu_s']:.2f} CPU s.", ""]
    if meta.get("notes"):
        lines += [meta["notes"], ""]
    return "\n".join(lines)




def render_llama3(summary: dict, runs: dict, facts: dict, meta: dict) -> str:
    """The "Llama 3: tokenize throughput" section: as render(), with the tiktoken file and tokenizer.json."""
    a, b, t = summary["A"], summary["B"], meta["tok"]
    n_ranks = t["vocab"] - 256
    lines = [
        SECTION_LLAMA3, "",
        f"Measured {meta['started']} with", "", "```", meta["command"], "```", "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), Linux {facts['kernel']}, Python {facts['python']}, "
        f"tiktoken {facts.get('tiktoken', '?')}, pyarrow {facts['pyarrow']}, datasets {facts['datasets']}, "
        f"transformers {facts['transformers']}, tokenizers {facts['tokenizers']}. Shared, noisy machine: the "
        f"runs alternate A and B (the order flips every run) and medians of {meta['runs']} runs are quoted. "
        f"Load average (1/5/15 min) {meta['load_start']} at start, {meta['load_end']} at the end; before "
        "each run: " + "; ".join(f"{k} " + ", ".join(r["load_before"].split()[0] for r in rs)
                                  for k, rs in runs.items()) + " (1 min).", "",
        f"Data: the same {meta['records']} generated RAG-like Alpaca records as \"Tokenize throughput\" "
        f"({meta['data_mb']:.1f} MB of JSON, sha256 {meta['data_sha256']}). max_seq_len {MAX_SEQ_LEN}, "
        f"{WORKERS} worker processes on both sides.", "",
        f"Tokenizer (nothing downloaded): a byte-level BPE trained with the `tokenizers` library "
        f"(BpeTrainer, min_frequency 2, asked for at most {meta['vocab_asked']:,} tokens) on the "
        f"{meta['train_records']:,} records' texts with Llama 3's pre-tokenisation (Meta's split regex, "
        f"`jora_model.data.tiktoken_file.PATTERN`, then ByteLevel without a regex of its own). The corpus "
        f"supports {n_ranks:,} tokens (256 bytes + {n_ranks - 256:,} merges) before no pair occurs twice; "
        f"with Meta's 256 special tokens after them the vocabulary is {t['vocab']:,} ids (Meta's Llama 3: "
        f"128,000 ranks + 256 = 128,256: the same format, split pattern, specials and BPE, but other ranks, learnt "
        f"from far more and more varied text; here the benchmark's own made-up 30,000-word lexicon is learnt "
        f"almost whole, {t['tokens_per_word']:.2f} tokens per word, fewer than a tokenizer not trained on "
        f"this text would give; both sides use the same ranks). Written twice: "
        f"as Meta's tiktoken file (`base64(token) rank` per line, ranks = the trainer's order: the bytes, then "
        f"the merges), which `jora tokenize` reads (TiktokenTokenizer: tiktoken with Meta's pattern, specials "
        f"never parsed from text); and as an HF tokenizer.json + tokenizer_config.json made from those ranks by "
        f"transformers' own `TikTokenConverter` (how HF's Llama 3 tokenizer.json is made: BPE with "
        f"ignore_merges, Split(Meta's regex) + ByteLevel(use_regex=False), the 256 specials as added tokens, "
        f"bos/eos `<|begin_of_text|>`/`<|end_of_text|>` = {t['bos']}/{t['eos']} on both sides), loaded by "
        f"`AutoTokenizer.from_pretrained` (PreTrainedTokenizerFast, which transformers 5 calls {t['hf_class']}). "
        f"Checked before timing: all "
        f"{t['texts']:,} texts of the {t['records']:,} records (instruction, input, output) encode to "
        f"identical ids with both ({t['identical']:,}/{t['texts']:,}).", "",
        "A = `stages.tokenize.tokenize(..., TokenizeSettings(max_seq_len=2000), workers=2, force=True)` with "
        "the tiktoken file (what `jora tokenize DATA OUT --tokenizer tokenizer.model --workers 2` runs): "
        "JSON -> validated records -> tiktoken in 2 spawned workers -> prompt cutting -> train/val Arrow "
        "shards + stats.json. B = `load_dataset(\"json\")` (fresh cache dir each run) -> "
        "`.map(fn, batched=True, num_proc=2, remove_columns=...)` (fn: same Alpaca prompt, prompt and response "
        "tokenized without special tokens, `[bos]+prompt+response+[eos]`, labels -100 over the prompt, "
        "attention_mask, the prompt's end truncated to fit) -> `save_to_disk`; no validation and no train/val "
        "split. Both timed end to end from the JSON file to Arrow on disk, in a fresh child process, after "
        "imports. Tokens = input_ids written. CPU s = user + system time of the child and its workers over "
        "the timed call (getrusage).", "",
        "| | median s | examples/s | tokens/s | runs (s) | CPU s (all processes) | tokens per CPU s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    names = {"A": "A: `jora tokenize` (stages.tokenize, 2 workers, tiktoken file)",
             "B": "B: `datasets.map(batched=True, num_proc=2)` + PreTrainedTokenizerFast (tokenizer.json)",
             "B1": "B1: `datasets.map(batched=False, num_proc=2)` + PreTrainedTokenizerFast (tokenizer.json)"}
    for kind, x in summary.items():
        lines.append(f"| {names[kind]} | {x['seconds']:.2f} | {x['ex_s']:,.0f} | {x['tok_s']:,.0f} "
                     f"| {', '.join(str(v) for v in x['all_seconds'])} | {x['cpu']:.1f} | {x['tok_cpu_s']:,.0f} |")
    lines.append("")
    pair = [rb["seconds"] / ra["seconds"] for ra, rb in zip(runs["A"], runs["B"])]
    lines.append(f"A / B: **{a['ex_s'] / b['ex_s']:.2f}x** examples/s, {a['tok_s'] / b['tok_s']:.2f}x tokens/s by "
                 f"medians (goal: at least 2x); run by run (B's s / A's s, {len(pair)} pairs): "
                 f"{', '.join(f'{x:.2f}' for x in pair)}, median {statistics.median(pair):.2f}x; "
                 f"{b['cpu'] / a['cpu']:.2f}x less CPU time.")
    c = meta["compare"]
    lines += ["",
              f"Same work: A wrote {a['examples']} examples / {a['tokens']:,} tokens ({meta['a_cut']} prompts cut, "
              f"{meta['a_dropped']} dropped), B {b['examples']} / {b['tokens']:,} "
              f"({100 * (b['tokens'] - a['tokens']) / a['tokens']:+.3f}% tokens); {c['identical']} of "
              f"{c['rows_a']} rows have identical input_ids in A and B, {c['differ']} differ (rows whose "
              "prompt was cut: A cuts the retrieved context at a token boundary and re-encodes, B truncates "
              "the prompt's token list, dropping the template's tail).", ""]
    p = meta.get("profile")
    if p:
        enc, tot = p["sentencepiece_s"], p["profiled_s"]
        ranks = p.get("read_ranks_s", 0.0)
        rest = tot - enc - p["read_json_s"] - p["arrow_s"] - ranks
        lines += [
            f"Where A's time goes (`--profile`: the stage with workers=1 in one process under cProfile with a "
            f"CPU-time clock: {tot:.1f} CPU s profiled, {p['cpu_s']:.1f} CPU s with the profiler's own cost; "
            f"load {p['load_before'].split()[0]}):", "",
            "| part | CPU s | share |", "|---|---:|---:|",
            f"| tiktoken's native encode (`CoreBPE.encode_ordinary`: {p.get('tiktoken_calls', 0):,} calls, "
            f"the regex split and the BPE; cutting {meta['a_cut']} long prompts: `_cut` {p['cut_s']:.2f} s in all) "
            f"| {enc:.2f} | {enc / tot:.0%} |",
            f"| reading the {n_ranks:,}-line ranks file (`read_tiktoken_ranks`, in Python: base64 per line; "
            f"twice in this one-process run, once per worker + once in the parent with 2 workers) "
            f"| {ranks:.2f} | {ranks / tot:.0%} |",
            f"| reading + parsing the JSON (`read_records`) | {p['read_json_s']:.2f} | {p['read_json_s'] / tot:.0%} |",
            f"| Arrow shards (`ShardWriter.add` + `close`) | {p['arrow_s']:.2f} | {p['arrow_s'] / tot:.0%} |",
            f"| the rest of the Python (prompt rendering, `tokenize_record`, ids to int32 arrays, stats, input "
            f"hashing) | {rest:.2f} | {rest / tot:.0%} |", "",
            f"Added by the 2-worker run: pickling tasks and results ({p['pickled_mb']:.0f} MB): "
            f"{p['pickle_dumps_s']:.2f} s dumps; starting the 2 spawned workers (interpreter, numpy, tiktoken, "
            f"the {n_ranks:,} ranks): {p['spawn_ready_s']:.2f} s until both take a task, {p['spawn_cpu_s']:.2f} CPU s.",
            ""]
    if meta.get("notes"):
        lines += [meta["notes"], ""]
    return "\n".join(lines)


def _command(argv: list[str]) -> str:
    """The command line as run, less the --notes text (which is in the section anyway)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--notes":
            skip = True
        elif not arg.startswith("--notes="):
            kept.append(arg)
    return shlex.join(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each contender; medians are reported")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jora-tokenize-throughput"))
    parser.add_argument("--tokenizer", choices=["sentencepiece", "llama3"], default="sentencepiece",
                        help="sentencepiece: a Llama-2-like SentencePiece model (section 'Tokenize throughput'); "
                             "llama3: a Llama-3-like byte-level BPE as Meta's tiktoken file for ours and as an HF "
                             f"tokenizer.json for datasets.map (section '{SECTION_LLAMA3}')")
    parser.add_argument("--vocab", type=int, default=None,
                        help="pieces (sentencepiece, default 32000) or at most this many ranks (llama3, default "
                             "128000: Meta's count; the corpus may support fewer)")
    parser.add_argument("--train-records", type=int, default=None,
                        help="records the tokenizer is trained on (default 3000 sentencepiece, all for llama3)")
    parser.add_argument("--unbatched", action="store_true", help="also time datasets.map(batched=False) (B1)")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS}")
    parser.add_argument("--notes", default="", help="a paragraph appended to the section")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: re-render the section from WORKDIR/results.json (e.g. with new --notes)")
    parser.add_argument("--profile", action="store_true",
                        help="also break A's time down (SentencePiece / JSON / Arrow / pickling / worker start)")
    parser.add_argument("--child", choices=["A", "B", "B1", "P"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    llama3 = args.tokenizer == "llama3"
    section_title = SECTION_LLAMA3 if llama3 else SECTION
    if args.vocab is None:
        args.vocab = 128000 if llama3 else 32000
    if args.train_records is None:
        args.train_records = args.records if llama3 else 3000
    if llama3 and args.workdir == parser.get_default("workdir"):
        args.workdir = Path(str(args.workdir) + "-llama3")
    if args.child:
        child(args)
        return

    if args.render_only:
        saved = json.loads((args.workdir.resolve() / "results.json").read_text())
        meta = saved["meta"] | {"notes": args.notes or saved["meta"].get("notes", ""),
                                "command": _command(shlex.split(saved["meta"]["command"]))}
        section = (render_llama3 if llama3 else render)(saved["summary"], saved["runs"], saved.get("facts") or machine_facts(), meta)
        print(section)
        if args.write:
            write_section(section_title, section)
            print(f"wrote the '{section_title}' section of {RESULTS}", file=sys.stderr)
        return
    command = _command([".venv/bin/python", os.path.relpath(__file__, REPO), *sys.argv[1:]])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = loadavg()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    data = ensure_data(workdir, args.records)
    if llama3:
        tokenizer = ensure_llama3_tokenizer(workdir, data, args.vocab, args.train_records)
    else:
        tokenizer = ensure_tokenizer(workdir, data, args.vocab, args.train_records)
    tok = check_tokenizers(tokenizer, data)
    if llama3 and tok["identical"] != tok["texts"]:
        sys.exit(f"the tiktoken file and tokenizer.json disagree on {tok['texts'] - tok['identical']} of "
                 f"{tok['texts']} texts: not timing")
    print(f"tokenizers agree on {tok['identical']}/{tok['texts']} texts; vocab {tok['vocab']}, "
          f"{tok['tokens_per_word']:.2f} tokens/word", file=sys.stderr, flush=True)

    kinds = ["A", "B"] + (["B1"] if args.unbatched else [])
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(args.runs):
        order = kinds if i % 2 == 0 else kinds[::-1]
        for kind in order:
            r = run_child(kind, data, tokenizer, workdir / f"out-{kind}", workdir / "logs" / f"{kind}-{i}.log")
            runs[kind].append(r)
            print(f"run {i} {kind}: {r['seconds']:.2f} s ({r['cpu']:.1f} CPU s), "
                  f"{r['examples'] / r['seconds']:,.0f} ex/s, "
                  f"{r['tokens'] / r['seconds']:,.0f} tok/s (load before {r['load_before']})",
                  file=sys.stderr, flush=True)
    load_end = loadavg()
    profile = None
    if args.profile:
        profile = run_child("P", data, tokenizer, workdir / "out-P", workdir / "logs" / "P.log")
        print(f"profile: {profile}", file=sys.stderr, flush=True)
    summary = summarize(runs)
    compare = compare_outputs(workdir / "out-A", workdir / "out-B")
    meta = {"started": started, "command": command, "runs": args.runs, "load_start": load_start,
            "load_end": load_end, "records": args.records, "data_mb": data.stat().st_size / 1e6,
            "train_records": args.train_records, "tok": tok, "compare": compare,
            "a_cut": runs["A"][0]["cut"], "a_dropped": runs["A"][0]["dropped"], "notes": args.notes,
            "profile": profile, "tokenizer": args.tokenizer, "vocab_asked": args.vocab,
            "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest()[:16]}
    facts = machine_facts()
    section = (render_llama3 if llama3 else render)(summary, runs, facts, meta)
    (workdir / "results.json").write_text(json.dumps({"runs": runs, "summary": summary, "meta": meta,
                                                      "facts": facts}, indent=1))
    print(section)
    print(json.dumps({"summary": summary, "compare": compare}, indent=1), file=sys.stderr)
    if args.write:
        write_section(section_title, section)
        print(f"wrote the '{section_title}' section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
