"""The finetune flow over the cached stages: what reruns when, lineage, and one run per work directory.

Flows run under Prefect's test harness (a temporary local API); the stage bodies are tested on their
own elsewhere, so these tests keep training to a few steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jora_model.errors import JoraError
from pipeline.demo import SAMPLE, TINY_MODEL, demo_settings
from pipeline.demo_source import make_demo_source
from tests.test_convert_stage import file_identities


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_demo_source(SAMPLE, TINY_MODEL, tmp_path_factory.mktemp("src") / "demo-source").out_dir


def _settings(workdir: Path, source: Path, data: Path = SAMPLE, **train):
    settings = demo_settings(workdir, source, data)
    return settings.model_copy(update={  # the gate has its own test (tests/test_gate.py)
        "train": settings.train.model_copy(update={"max_steps": 3, "eval_every": 0, **train}),
        "eval": settings.eval.model_copy(update={"gate": False}),
        "export": settings.export.model_copy(update={"verify": False})})


def _ran(result) -> set[str]:
    return {name for name, stage in result["stages"].items() if not stage["skipped"]}


ALL = {"convert", "tokenize", "train", "merge", "export", "export-adapter"}


def test_reruns_exactly_what_changed(harness, source, tmp_path):
    from pipeline.flow import finetune

    work = tmp_path / "work"
    first = finetune(_settings(work, source))
    assert _ran(first) == ALL
    assert (Path(first["hf_model"]) / "config.json").is_file()

    outputs = {d.name: file_identities(d) for d in work.iterdir() if d.is_dir()}
    assert _ran(finetune(_settings(work, source))) == set()  # everything up to date
    assert {name: file_identities(work / name) for name in outputs} == outputs  # and nothing rewritten

    shutil.rmtree(work / "merged")  # one output deleted: that stage and what follows it
    assert _ran(finetune(_settings(work, source))) == {"merge", "export"}

    changed = finetune(_settings(work, source, lr=5e-3))  # a training setting
    assert _ran(changed) == {"train", "merge", "export", "export-adapter"}

    records = json.loads(SAMPLE.read_text())
    fresh = tmp_path / "refreshed.json"
    fresh.write_text(json.dumps(records[::-1][:40]))  # refreshed retrieved context
    refreshed = finetune(_settings(work, source, data=fresh, lr=5e-3, warm_start=True))
    assert _ran(refreshed) == ALL - {"convert"}
    runs = json.loads((work / "lineage.json").read_text())["runs"]  # every run's record, newest last
    assert [set(r["ran"]) for r in runs] == [ALL, set(), {"merge", "export"}, _ran(changed), _ran(refreshed)]
    lineage = runs[-1]
    assert lineage["data"]["path"] == str(fresh) and len(lineage["data"]["sha256"]) == 64
    assert runs[0]["data"]["path"] == str(SAMPLE) and runs[0]["data"]["sha256"] != lineage["data"]["sha256"]
    assert lineage["warm_started_from"] and lineage["stage_keys"]["convert"] == first["stages"]["convert"]["key"]
    assert lineage["train"]["final_loss"] == refreshed["stages"]["train"]["final_loss"] is not None


def test_one_run_per_work_directory(harness, source, tmp_path):
    from pipeline.flow import RunLock, finetune

    work = tmp_path / "work"
    with RunLock(work):
        with pytest.raises(JoraError, match="another jora run"):
            finetune(_settings(work, source))


def test_overrides_for_deployment_runs(harness, source, tmp_path):
    from pipeline.flow import apply_overrides

    settings = _settings(tmp_path, source)
    changed = apply_overrides(settings, {"train.lr": 3e-4, "data.path": "/new.json"})
    assert changed.train.lr == 3e-4 and changed.data.path == "/new.json" and changed.lora == settings.lora
    with pytest.raises(JoraError, match="bad override"):
        apply_overrides(settings, {"train.lr": -1})
    with pytest.raises(JoraError, match="cannot set data.path.x: data.path is a value"):
        apply_overrides(settings, {"data.path.x": 1})
