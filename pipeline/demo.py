"""`jora run --demo`: the whole flow on bundled data and a tiny random Llama, in a work directory.

The demo checkpoint (Meta's layout, with a tokenizer trained on the sample data: SentencePiece for the
"llama2" family, a tiktoken ranks file for "llama3") is built first, then the `finetune` flow runs every
stage on it, and the trained model answers a question of the golden set from its retrieved passages.
The data is a synthetic retrieval task (pipeline/demo_data.py): where a team meets, when its review is or
who leads it, answered from one of several retrieved passages, each about another team.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jora_model.errors import JoraError
from pipeline.settings import (DataSection, EvalSection, ExportSection, FinetuneSettings, LoraSection,
                               ModelSection, TrainSection)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SAMPLE, TINY_MODEL = DATA_DIR / "sample_alpaca.json", DATA_DIR / "tiny_llama.json"
GOLDEN = DATA_DIR / "golden_alpaca.json"  # held-out records of the sample's task (tests/test_demo_data.py)
MODELS = {"llama2": TINY_MODEL, "llama3": DATA_DIR / "tiny_llama3.json"}  # the tiny model of each family
# The golden set's first record (a test keeps them in step): the question, the passages retrieved for it.
QUESTION = "On which day is the review of the legal team?"
CONTEXT = ("[1] (handbook) The legal team has its review on Thursday.\n"
           "[2] (calendar) The marketing team meets in Lisbon.\n"
           "[3] (handbook) Omar leads the security team.")
EXPECTED = "Thursday"  # that record's answer
# Over the sample's 3,600 training records. Many records, few epochs: 1,200 records over 20 epochs were
# memorised (the training loss fell, the eval loss did not).
EPOCHS = 5
# Said with the answer, so that a first-time user knows what to expect of a model this small.
ANSWER_NOTE = (f"(asked with its retrieved passages; the answer is {EXPECTED}. A tiny random model trained for a "
               "minute or two: it learned to pick a team's meeting city, review day or lead from passages like these, "
               "most of the time, and can answer nothing else)")


@dataclass(frozen=True)
class DemoResult:
    workdir: Path
    hf_model: Path | None  # the published one (None: the gate held back the first run's adapter)
    adapter: Path
    peft_adapter: Path | None
    stages: dict
    question: str
    answer: str  # the trained model's answer to `question`, from the golden record's passages
    scores: "GoldenScores"
    gate: dict | None  # the flow's gate decision (None: eval.gate off)


@dataclass(frozen=True)
class GoldenScores:
    """Exact match on the golden set: what the demo shows it learned."""
    n: int
    trained: float  # the new adapter, with the retrieved passages
    no_context: float | None  # the new adapter, the passages left out
    base: float  # the untrained base model, with the passages

    def line(self) -> str:
        no_context = f"{self.no_context:.2f}" if self.no_context is not None else "n/a"
        return (f"Golden set ({self.n} questions), exact match: {self.trained:.2f} trained, {no_context} trained "
                f"without the passages, {self.base:.2f} for the base model")


def prepare_demo(workdir: Path, family: str = "llama2") -> FinetuneSettings:
    """Build the demo checkpoint of `family` (cached like a stage) and return the settings that run on it."""
    from pipeline.demo_source import make_demo_source

    if family not in MODELS:
        raise JoraError(f"unknown demo family {family!r}; choose {' or '.join(MODELS)}")
    for path in (SAMPLE, MODELS[family]):
        if not path.is_file():
            raise JoraError("bundled demo data not found (run from a checkout of jora)", path)
    workdir = Path(workdir).resolve()
    source = make_demo_source(SAMPLE, MODELS[family], workdir / "demo-source", family)
    return demo_settings(workdir, source.out_dir, SAMPLE)


def demo_settings(workdir: Path, checkpoint: Path, data: Path) -> FinetuneSettings:
    """What the tiny model needs to learn the bundled task (see ANSWER_NOTE) in a few minutes on 2 cores.
    lr 2e-3 learns it (1e-3 more slowly, 3e-3 not at all); rows stay under 128 tokens (one pad multiple),
    max_seq_len 256 only makes sure that no context is cut."""
    return FinetuneSettings(
        workdir=str(workdir),
        model=ModelSection(checkpoint=str(checkpoint), dtype="bf16"),
        data=DataSection(path=str(data), max_seq_len=256, val_fraction=0.1),
        lora=LoraSection(r=32, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]),
        train=TrainSection(lr=2e-3, batch_size=8, grad_accum=1, epochs=EPOCHS, eval_every=500, checkpoint_every=1000,
                           warmup_ratio=0.1),
        eval=EvalSection(data=str(GOLDEN)),
        export=ExportSection(dtype="bf16"),
    )


def answer(store: Path, adapter: Path, question: str = QUESTION, max_new_tokens: int = 40, *,
           context: str = CONTEXT) -> str:
    """The trained model's greedy answer to `question` given `context`, prompted with the training template."""
    from jora_model import load_model
    from jora_model.model.generate import SamplingSettings, generate_text
    from jora_model.data.tokenizer import load_tokenizer

    model = load_model(store, dtype="float32", adapter=adapter)
    return generate_text(model, load_tokenizer(store), question, context,
                         SamplingSettings(max_new_tokens=max_new_tokens))


def answer_line(text: str, limit: int = 300) -> str:
    """The demo's answer as `jora run --demo` prints it: on one line, quoted, with what to expect of it."""
    shown = " ".join(text[:limit].split())
    return f'A: "{shown}{"..." if len(text) > limit else ""}" {ANSWER_NOTE}'


def run_demo(workdir: Path, family: str = "llama2", overrides: dict | None = None) -> DemoResult:
    """The flow on the demo; `overrides` maps dotted settings to values, as `jora run --set` gives them
    (relative paths are taken from the current directory)."""
    from pipeline.flow import apply_overrides, finetune

    settings = prepare_demo(workdir, family)
    if overrides:
        settings = apply_overrides(settings, overrides).resolved(Path.cwd())
    result = finetune(settings)
    work = Path(settings.workdir)
    return DemoResult(work, Path(result["hf_model"]) if result["hf_model"] else None, Path(result["adapter"]),
                      Path(result["peft_adapter"]) if result["peft_adapter"] else None, result["stages"], QUESTION,
                      answer(work / "store", Path(result["adapter"])),
                      golden_scores(settings, Path(result["adapter"]), result["gate"]), result["gate"])


def golden_scores(settings: FinetuneSettings, adapter: Path, gate: dict | None) -> GoldenScores:
    """The trained adapter's and the base model's exact match on the golden set (eval.data), from the
    evaluate stage: the flow's own evaluations where its gate ran them, else made here (and cached)."""
    from pipeline.flow import evaluation_settings, golden_set
    from stages.evaluate import evaluate

    work = Path(settings.workdir)
    golden, evaluation = golden_set(settings), evaluation_settings(settings)

    def report(out: str, with_adapter: Path | None, done_by_gate: dict | None) -> dict:
        if done_by_gate is not None:
            return done_by_gate
        done = evaluate(work / "store", golden, work / out, adapter=with_adapter, settings=evaluation,
                        tokenized=work / "tokenized")
        return json.loads((Path(done.out_dir) / "report.json").read_text())

    against_base = gate is not None and gate["decision"]["against"] == "base model"
    trained = report("evaluate", adapter, gate["reports"]["new"] if gate else None)
    base = report("evaluate-base", None, gate["reports"]["published"] if against_base else None)
    no_context = (trained.get("no_context") or {}).get("exact_match")
    return GoldenScores(trained["n"], trained["exact_match"], no_context, base["exact_match"])
