"""`jora run --demo`: the whole pipeline on bundled data and a tiny random Llama, in a work directory.

Today it runs the stages that exist (demo source -> convert -> tokenize -> train) and a forward pass
through the base model with the trained adapter; merge and export join as they land.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jora_model.errors import JoraError
from stages.convert import ConvertSettings, convert
from stages.demo_source import make_demo_source
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
    prompt: str
    next_tokens: list[str]  # the random model's most likely next pieces: proof the store runs


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
    return DemoResult(source.out_dir, store.out_dir, shards.out_dir, format_report(shards.manifest["facts"]),
                      trained.out_dir / "adapter", trained.manifest["facts"].get("eval_loss"),
                      *_peek(store.out_dir, trained.out_dir))


def demo_train_settings():
    """Small enough to finish in about a minute on 2 cores; large enough to see the loss fall."""
    from jora_model.lora import LoraSettings
    from jora_model.trainer import TrainSettings

    return TrainSettings(lora=LoraSettings(r=8, alpha=16), lr=2e-3, batch_size=4, grad_accum=1, max_seq_len=512,
                         epochs=2, eval_every=10, checkpoint_every=10)


def _peek(store_dir: Path, adapter: Path) -> tuple[str, list[str]]:
    """The trained model's most likely first pieces of the answer to a demo question, prompted with
    the template it was trained on."""
    import numpy as np

    from jora_model import load_model
    from jora_model.alpaca import render_prompt
    from jora_model.tokenizer import Tokenizer

    model = load_model(store_dir, dtype="float32", adapter=adapter)
    tokenizer = Tokenizer(store_dir)
    question = "How often should the robot batteries be checked?"
    ids = [tokenizer.bos_id] + tokenizer.encode(render_prompt(question, ""))
    logits = model.logits(np.array([ids]))[0, -1]
    return question, [tokenizer.piece(int(i)) for i in np.argsort(-logits)[:5]]
