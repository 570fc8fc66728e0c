"""`jora run --demo`: the whole pipeline on bundled data and a tiny random Llama, in a work directory.

Today it runs the stages that exist (demo source -> convert, tokenize) and a forward pass through
the store; train, merge and export join as they land.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jora_model.errors import JoraError
from stages.convert import ConvertSettings, convert
from stages.demo_source import make_demo_source
from stages.tokenize import TokenizeSettings, format_report, tokenize

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
log = logging.getLogger("jora")


@dataclass(frozen=True)
class DemoResult:
    source: Path
    store: Path
    shards: Path
    report: str
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
    return DemoResult(source.out_dir, store.out_dir, shards.out_dir, format_report(shards.manifest["facts"]),
                      *_peek(store.out_dir))


def _peek(store_dir: Path) -> tuple[str, list[str]]:
    import numpy as np
    import sentencepiece

    from jora_model import load_model

    model = load_model(store_dir, dtype="float32")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(store_dir / "tokenizer.model"))
    prompt = "How often should the robot batteries be checked?"
    ids = [processor.bos_id()] + processor.EncodeAsIds(prompt)
    logits = model.logits(np.array([ids]))[0, -1]
    return prompt, [processor.IdToPiece(int(i)) for i in np.argsort(-logits)[:5]]
