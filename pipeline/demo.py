"""`jora run --demo`: the whole pipeline on bundled data and a tiny random Llama, in a work directory.

It runs every stage (demo source -> convert -> tokenize -> train -> export with the adapter merged,
and export-adapter) and ends with the trained model's answer to a demo question. The Prefect flow
over the same stages arrives with the pipeline issue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jora_model.errors import JoraError
from stages.convert import ConvertSettings, convert
from stages.demo_source import make_demo_source
from stages.export import export, export_adapter
from stages.tokenize import TokenizeSettings, format_report, tokenize
from stages.train import train

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
log = logging.getLogger("jora")


@dataclass(frozen=True)
class DemoResult:
    source: Path
    store: Path
    shards: Path
    report: str
    adapter: Path
    eval_loss: float | None
    hf_model: Path
    peft_adapter: Path
    question: str
    answer: str  # what the tiny random model learned to say in a minute: proof the pipeline runs


def run_demo(workdir: Path) -> DemoResult:
    sample, settings = DATA_DIR / "sample_alpaca.json", DATA_DIR / "tiny_llama.json"
    for path in (sample, settings):
        if not path.is_file():
            raise JoraError("bundled demo data not found (run from a checkout of jora)", path)
    workdir = Path(workdir)
    source = make_demo_source(sample, settings, workdir / "demo-source")
    store = convert(source.out_dir, workdir / "store", ConvertSettings(dtype="bf16"))
    shards = tokenize(sample, workdir / "tokenized", store.out_dir,
                      TokenizeSettings(max_seq_len=512, val_fraction=0.1))
    trained = train(store.out_dir, shards.out_dir, workdir / "adapter", demo_train_settings())
    hf_model = export(store.out_dir, workdir / "hf-model", adapter=trained.out_dir)
    peft_adapter = export_adapter(store.out_dir, trained.out_dir, workdir / "peft-adapter")
    return DemoResult(source.out_dir, store.out_dir, shards.out_dir, format_report(shards.manifest["facts"]),
                      trained.out_dir / "adapter", trained.manifest["facts"].get("eval_loss"), hf_model.out_dir,
                      peft_adapter.out_dir, *_answer(store.out_dir, trained.out_dir))


def demo_train_settings():
    """Small enough to finish in about a minute on 2 cores; large enough to see the loss fall."""
    from jora_model.lora import LoraSettings
    from jora_model.trainer import TrainSettings

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return TrainSettings(lora=LoraSettings(r=16, alpha=32, targets=targets), lr=1e-2, batch_size=4, grad_accum=1,
                         max_seq_len=512, epochs=4, eval_every=10, checkpoint_every=20, warmup_ratio=0.1)


def _answer(store_dir: Path, adapter: Path) -> tuple[str, str]:
    """The trained model's greedy answer to a demo question, prompted with the training template."""
    from jora_model import load_model
    from jora_model.generate import SamplingSettings, generate_text
    from jora_model.tokenizer import Tokenizer

    question = "How often should the robot batteries be checked?"
    model = load_model(store_dir, dtype="float32", adapter=adapter)
    return question, generate_text(model, Tokenizer(store_dir), question, "", SamplingSettings(max_new_tokens=40))
