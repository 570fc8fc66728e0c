"""`jora run --demo`: the whole flow on bundled data and a tiny random Llama, in a work directory.

The demo checkpoint (Meta's layout, with a tokenizer trained on the sample data: SentencePiece for the
"llama2" family, a tiktoken ranks file for "llama3") is built first, then the `finetune` flow runs every
stage on it, and the trained model answers a question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jora_model.errors import JoraError
from pipeline.settings import DataSection, ExportSection, FinetuneSettings, LoraSection, ModelSection, TrainSection

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SAMPLE, TINY_MODEL = DATA_DIR / "sample_alpaca.json", DATA_DIR / "tiny_llama.json"
MODELS = {"llama2": TINY_MODEL, "llama3": DATA_DIR / "tiny_llama3.json"}  # the tiny model of each family
QUESTION = "How often should the robot batteries be checked?"
# Said with the answer: without it, a first-time user reads the gibberish as the pipeline being broken.
ANSWER_NOTE = "(a tiny random model trained for a minute: expect gibberish; the pipeline ran end to end)"


@dataclass(frozen=True)
class DemoResult:
    workdir: Path
    hf_model: Path
    adapter: Path
    peft_adapter: Path | None
    stages: dict
    question: str
    answer: str  # what the tiny random model learned to say in a minute: proof the pipeline runs


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
    """Small enough to finish in about a minute on 2 cores; large enough to see the loss fall."""
    return FinetuneSettings(
        workdir=str(workdir),
        model=ModelSection(checkpoint=str(checkpoint), dtype="bf16"),
        data=DataSection(path=str(data), max_seq_len=512, val_fraction=0.1),
        lora=LoraSection(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]),
        train=TrainSection(lr=1e-2, batch_size=4, grad_accum=1, epochs=4, eval_every=10, checkpoint_every=20,
                           warmup_ratio=0.1),
        export=ExportSection(dtype="bf16"),
    )


def answer(store: Path, adapter: Path, question: str = QUESTION, max_new_tokens: int = 40) -> str:
    """The trained model's greedy answer, prompted with the training template."""
    from jora_model import load_model
    from jora_model.model.generate import SamplingSettings, generate_text
    from jora_model.data.tokenizer import load_tokenizer

    model = load_model(store, dtype="float32", adapter=adapter)
    return generate_text(model, load_tokenizer(store), question, "", SamplingSettings(max_new_tokens=max_new_tokens))


def answer_line(text: str, limit: int = 300) -> str:
    """The demo's answer as `jora run --demo` prints it: on one line, quoted, and said to be gibberish."""
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
