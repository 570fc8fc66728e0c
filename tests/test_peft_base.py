"""Issue 22: the PEFT adapter loads with `AutoPeftModelForCausalLM.from_pretrained(dir)` alone.

Its adapter_config.json must name an HF export of the unmerged base, which the flow writes as its own
cached stage (hf-base/) and `jora export-adapter --base-hf DIR` takes after checking it is one.
Oracle: peft's AutoPeftModelForCausalLM (which loads the base through transformers by that name),
against jora's own logits with the adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from click.testing import CliRunner

from jora_model import load_model
from pipeline.cli import cli
from stages.export import TOLERANCE, export
from tests.test_convert_stage import assert_clean_failure, file_identities
from tests.test_pipeline import _ran, _settings, harness, source  # noqa: F401  (module-scoped fixtures)


@pytest.fixture(scope="module")
def flow_run(harness, source, tmp_path_factory):  # noqa: F811
    from pipeline.flow import finetune

    work = tmp_path_factory.mktemp("peft-base") / "work"
    settings = _settings(work, source)  # with the self-checks on: the adapter's runs on hf-base itself
    settings = settings.model_copy(update={"export": settings.export.model_copy(update={"verify": True})})
    return work, settings, finetune(settings)


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_auto_peft_loads_the_flow_adapter_and_matches_ours(flow_run):
    work, settings, result = flow_run
    base = (work / "hf-base").resolve()
    assert Path(result["hf_base"]).resolve() == base and (base / "config.json").is_file()
    config = json.loads((work / "peft-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    facts = json.loads((work / "peft-adapter" / "jora-manifest.json").read_text())["facts"]
    assert facts["max_abs_diff"] < 1e-4  # the flow's own check, run on hf-base (a bf16 store, a bf16 base)

    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(work / "peft-adapter"), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 64))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = load_model(work / "store", dtype="float32", adapter=work / "train").logits(tokens)
    limit = TOLERANCE * max(1.0, float(np.abs(ours).max()))
    assert np.abs(theirs - ours).max() < limit
    without = load_model(work / "store", dtype="float32").logits(tokens)
    assert np.abs(ours - without).max() > 10 * limit  # the adapter shows, so a base-only load would fail


def test_rerun_skips_the_base_and_the_adapter(flow_run):
    from pipeline.flow import finetune

    work, settings, _ = flow_run
    before = {name: file_identities(work / name) for name in ("hf-base", "peft-adapter")}
    again = finetune(settings)
    assert _ran(again) == set() and again["stages"]["export-adapter"]["base"]["skipped"]
    assert {name: file_identities(work / name) for name in before} == before

    shutil.rmtree(work / "hf-base")  # the base gone: it is written again, and the adapter that names it
    rebuilt = finetune(settings)
    assert _ran(rebuilt) == {"export-adapter"} and not rebuilt["stages"]["export-adapter"]["base"]["skipped"]
    assert (work / "hf-base" / "config.json").is_file()


def test_base_hf_that_is_not_this_base_is_refused(flow_run, tmp_path):
    work, _, _ = flow_run
    store, train = work / "store", work / "train"
    out = tmp_path / "p"
    # the merged model's export has the very same config.json: only its manifest tells it apart
    assert_clean_failure(_invoke("export-adapter", "--model", store, train, out, "--base-hf", work / "hf-model"),
                         "--base-hf is an export of another parameter store")
    assert_clean_failure(_invoke("export-adapter", "--model", store, train, out, "--base-hf", work / "tokenized"),
                         "no config.json")
    merged_in = export(store, tmp_path / "merged-in", adapter=train, verify=False).out_dir  # this store, plus
    assert_clean_failure(_invoke("export-adapter", "--model", store, train, out, "--base-hf", merged_in),
                         "with an adapter merged in")
    other = tmp_path / "other"  # an HF directory jora did not write, of another shape
    shutil.copytree(work / "hf-base", other)
    (other / "jora-manifest.json").unlink()
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    assert_clean_failure(_invoke("export-adapter", "--model", store, train, out, "--base-hf", other),
                         "not an export of", "num_hidden_layers")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_base_hf_not_written_by_jora_is_named_and_no_base_hf_warns_once(flow_run, tmp_path):
    work, _, _ = flow_run
    store, train = work / "store", work / "train"
    copy = tmp_path / "hf"  # the same base, as a plain HF directory (no jora manifest)
    shutil.copytree(work / "hf-base", copy)
    (copy / "jora-manifest.json").unlink()
    named = _invoke("export-adapter", "--model", store, train, tmp_path / "p", "--base-hf", copy)
    assert named.exit_code == 0 and "AutoPeftModelForCausalLM" not in named.stderr
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(copy.resolve())

    plain = _invoke("export-adapter", "--model", store, train, tmp_path / "q", "--no-verify")
    assert plain.exit_code == 0 and plain.stderr.count("AutoPeftModelForCausalLM") == 1
    assert "--base-hf" in plain.stderr and f"jora export {store}" in plain.stderr
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(store.resolve())
