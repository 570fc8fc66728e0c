"""`jora run --demo`: the whole flow on bundled data and a tiny random Llama, in a work directory.

The demo checkpoint (Meta's layout, with a tokenizer trained on the sample data: SentencePiece for the
"llama2" family, a tiktoken ranks file for "llama3") is built first, then the `finetune` flow runs every
stage on it, and the trained model answers a question of the golden set from its retrieved passages.
The data is a synthetic retrieval task (pipeline/demo_data.py): where a team meets, when its review is or
who leads it, answered from one of several retrieved passages, each about another team.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jora_model.errors import JoraError
from pipeline.settings import DataSection, ExportSection, FinetuneSettings, LoraSection, ModelSection, TrainSection

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
    hf_model: Path
    adapter: Path
    peft_adapter: Path | None
    stages: dict
    question: str
    answer: str  # the trained model's answer to `question`, from the golden record's passages


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


def run_demo(workdir: Path, family: str = "llama2") -> DemoResult:
    from pipeline.flow import finetune

    settings = prepare_demo(workdir, family)
    result = finetune(settings)
    work = Path(settings.workdir)
    return DemoResult(work, Path(result["hf_model"]), Path(result["adapter"]),
                      Path(result["peft_adapter"]) if result["peft_adapter"] else None, result["stages"], QUESTION,
                      answer(work / "store", Path(result["adapter"])))
