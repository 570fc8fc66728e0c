"""The evaluation gate in the flow, end to end (issue 23): a retrain on good data is published over the
base model; a poisoned retrain (every answer moved to another record's question) is kept back, the
published merged model, HF export and PEFT adapter stay byte for byte as they were, and lineage says why
with both reports.

The gate compares the golden set's loss here: on a tiny random model trained for a few dozen steps the
generated answers are not yet right, but the loss of the right answers moves at once, down when the
model learns the mapping and up when it learns a shuffled one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.settings import FinetuneSettings
from tests.test_convert_stage import file_identities
from tests.train_helpers import tiny_store

NAMES = "aldo bruna cesar dalia elio fiora gino hedda ivo jana kurt lena".split()
COLOURS = "red green blue amber violet white black grey pink brown olive teal".split()


def _records(shift: int = 0) -> list[dict]:
    """Who wears which colour (a mapping a tiny model memorises in a few dozen steps); `shift` moves
    every answer to the record `shift` places on (a broken data refresh)."""
    records = [{"instruction": f"Which colour does {name} wear?", "input": "", "output": colour}
               for name, colour in zip(NAMES, COLOURS)]
    answers = [r["output"] for r in records]
    return [{**r, "output": answers[(i + shift) % len(answers)]} for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_model):
    root = tmp_path_factory.mktemp("gate")
    tiny_store(root, tokenizer_model, seed=0)
    for name, shift in (("good", 0), ("poisoned", 5)):
        (root / f"{name}.json").write_text(json.dumps(_records(shift) * 4))
    (root / "golden.json").write_text(json.dumps(_records(0)))
    return root


def _settings(root: Path, work: Path, data: str, **gate) -> FinetuneSettings:
    return FinetuneSettings.model_validate({
        "workdir": str(work), "model": {"checkpoint": str(root / "hf-0-4-2")},
        "data": {"path": str(root / f"{data}.json"), "max_seq_len": 192, "val_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
        "train": {"lr": 3e-2, "batch_size": 4, "grad_accum": 1, "max_steps": 60, "eval_every": 0, "warmup_ratio": 0},
        "eval": {"data": str(root / "golden.json"), "metric": "loss", "max_new_tokens": 4, **gate},
        "export": {"verify": False}})


PUBLISHED = ("merged", "hf-model", "peft-adapter", "hf-base")


def test_a_poisoned_retrain_is_kept_back_and_the_published_model_stays(harness, files, tmp_path):
    from pipeline.flow import finetune

    work = tmp_path / "work"
    first = finetune(_settings(files, work, "good"))
    decision = first["gate"]["decision"]
    assert decision["promote"] and decision["against"] == "base model", decision
    assert decision["new"] < decision["published"] - 0.1, decision  # the mapping was learned
    assert {"evaluate", "evaluate-base", "merge", "export", "export-adapter"} <= first["stages"].keys()
    published = {name: file_identities(work / name) for name in PUBLISHED}

    poisoned = finetune(_settings(files, work, "poisoned"))
    decision = poisoned["gate"]["decision"]
    assert not decision["promote"] and decision["against"] == "published model", decision
    assert decision["new"] > decision["published"] + 0.01
    assert f"{decision['new']:.4f}" in decision["reason"] and f"{decision['published']:.4f}" in decision["reason"]
    assert not {"merge", "export", "export-adapter"} & poisoned["stages"].keys()
    assert {name: file_identities(work / name) for name in PUBLISHED} == published

    runs = json.loads((work / "lineage.json").read_text())["runs"]
    assert [r["gate"]["decision"]["promote"] for r in runs] == [True, False]
    last = runs[-1]["gate"]
    assert last["decision"]["reason"] == decision["reason"]
    assert last["reports"]["new"]["loss"] == decision["new"] and last["reports"]["published"]["loss"] == \
        decision["published"]
    assert last["reports"]["new"]["data_sha256"] == last["reports"]["published"]["data_sha256"]  # one golden set

    again = finetune(_settings(files, work, "poisoned"))  # the schedule fires again on the same bad data
    assert not again["gate"]["decision"]["promote"]
    assert all(s["skipped"] for s in again["stages"].values())
    assert {name: file_identities(work / name) for name in PUBLISHED} == published

    forced = finetune(_settings(files, work, "poisoned", gate=False))  # the team turns the gate off
    assert forced["gate"] is None and not forced["stages"]["merge"]["skipped"]
