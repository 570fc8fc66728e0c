"""Silent mix-ups refused in one line (issue 22): an adapter on a base it was not trained on (the merged
model included), shards made by another tokenizer, a negative --lora-alpha, a malformed JSON Lines line,
and a --set key into a value."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from jora_model.data.shards import Row, ShardSet, ShardWriter
from jora_model.errors import JoraError
from jora_model.model.lora import LoraSettings
# Imported here, not first inside a CliRunner invocation of `jora run`: prefect sets itself up at import on
# the streams of the moment, CliRunner's are closed when the invocation ends, and pytest's capture then fails.
import pipeline.flow  # noqa: F401
from pipeline.cli import cli
from pipeline.settings import load_settings, set_dotted
from stages.base import upstream_key
from stages.convert import ConvertSettings, convert
from stages.merge import merge
from tests.oracles.checkpoints import train_tokenizer
from tests.test_convert_stage import assert_clean_failure, file_identities, no_leftovers
from tests.train_helpers import tiny_data, tiny_run, tiny_store

TRAIN = ["--lora-r", "4", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "256", "--max-steps", "1",
         "--eval-every", "0", "--lr", "1e-3"]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_model):
    """Two bases of the same shape and other weights (seed 0 and 1), shards and an adapter trained on base 0."""
    root = tmp_path_factory.mktemp("mixups")
    _, base = tiny_store(root, tokenizer_model, seed=0)
    _, other = tiny_store(root, tokenizer_model, seed=1)
    data = tiny_data(root, tokenizer_model)
    run = tiny_run(base, data, root / "run")
    return root, base, other, data, run / "adapter"


def _base_hash(adapter: Path) -> str:
    return json.loads((adapter / "adapter.json").read_text())["base_hash"]


def _applying(store: Path, adapter: Path, out: Path, *extra) -> dict[str, list]:
    """Each command that applies an adapter to a store, with its arguments."""
    return {"merge": ["merge", "--model", store, "--adapter", adapter, out / "merged", *extra],
            "export": ["export", store, out / "hf", "--adapter", adapter, "--no-verify", *extra],
            "export-adapter": ["export-adapter", "--model", store, adapter, out / "peft", "--no-verify", *extra],
            "generate": ["generate", "--model", store, "--adapter", adapter, "--prompt", "check the battery",
                         "--max-new-tokens", "2", *extra]}


def test_an_adapter_on_another_base_is_refused_by_every_command(world, tmp_path):
    root, base, other, data, adapter = world
    recorded, theirs = _base_hash(adapter), upstream_key(other, "parameter store")
    assert recorded.split(".")[0] != theirs.split(".")[0]
    before = {path: file_identities(path) for path in (other, adapter)}
    for command, args in _applying(other, adapter, tmp_path).items():
        result = _invoke(*args)
        assert_clean_failure(result, str(adapter), recorded[:16], theirs[:16], str(other), "--allow-other-base")
        assert "merged in" not in result.stderr, command  # a plain other base: no talk of merging
    assert list(tmp_path.iterdir()) == [] and all(file_identities(p) == v for p, v in before.items())
    # the override: the command runs and says what it overrode
    forced = _invoke(*_applying(other, adapter, tmp_path, "--allow-other-base")["merge"])
    assert forced.exit_code == 0 and "using it anyway" in forced.stderr, forced.output
    assert _invoke(*_applying(other, adapter, tmp_path, "--allow-other-base")["generate"]).exit_code == 0


def test_the_right_base_is_accepted_even_when_rebuilt(world, tmp_path):
    """convert --force gives the same weights a new build id: the adapter still fits, so it is not refused."""
    root, base, other, data, adapter = world
    rebuilt = tmp_path / "store"
    shutil.copytree(base, rebuilt)
    convert(root / "hf-0-4-2", rebuilt, ConvertSettings(dtype="fp32"), force=True, progress=False)
    assert upstream_key(rebuilt, "parameter store") != _base_hash(adapter)  # another build of the same key
    for command, args in _applying(rebuilt, adapter, tmp_path).items():
        result = _invoke(*args)
        assert result.exit_code == 0 and "trained on base" not in result.stderr, (command, result.output)


def test_the_merged_model_is_refused_as_a_base_for_its_own_adapter(world, tmp_path):
    root, base, other, data, adapter = world
    merged = merge(base, adapter, tmp_path / "merged", progress=False).out_dir
    assert upstream_key(merged, "parameter store").split(".")[0] != _base_hash(adapter).split(".")[0]
    for command in ("merge", "generate"):
        result = _invoke(*_applying(merged, adapter, tmp_path / "again")[command])
        assert_clean_failure(result, str(adapter), str(merged), "merged in", "twice", "--allow-other-base")
    assert not (tmp_path / "again").exists()


def test_an_adapter_without_a_base_hash_is_accepted_with_a_warning(world, tmp_path):
    root, base, other, data, adapter = world
    older = tmp_path / "older"
    shutil.copytree(adapter, older)
    meta = json.loads((older / "adapter.json").read_text())
    del meta["base_hash"]
    (older / "adapter.json").write_text(json.dumps(meta))
    result = _invoke(*_applying(other, older, tmp_path)["merge"])
    assert result.exit_code == 0 and "records no base hash" in result.stderr and str(older) in result.stderr


def _tokenize(data_json: Path, out: Path, tokenizer: Path):
    return _invoke("tokenize", data_json, out, "--tokenizer", tokenizer, "--max-seq-len", "256",
                   "--val-fraction", "0", "--workers", "1")


def test_shards_from_another_tokenizer_are_refused(world, tmp_path, tokenizer_model):
    root, base, other, data, adapter = world
    assert ShardSet(data / "train").tokenizer_sha256() == _sha256(tokenizer_model)
    assert ShardSet(data / "train").metadata() == {}  # plain alpaca: the template part is as it was
    foreign = train_tokenizer(tmp_path / "tok" / "tokenizer.model", vocab_size=310)  # its ids fit the model
    assert _tokenize(root / "data-0.json", tmp_path / "shards", foreign).exit_code == 0
    out = tmp_path / "run"
    result = _invoke("train", "--model", base, "--data", tmp_path / "shards", out, *TRAIN)
    assert_clean_failure(result, "another tokenizer", _sha256(foreign)[:16], _sha256(tokenizer_model)[:16],
                         str(base / "tokenizer.model"), str(tmp_path / "shards" / "train"))
    assert not out.exists() and no_leftovers(tmp_path, "run")


def test_shards_without_a_tokenizer_hash_train_with_a_warning(world, tmp_path):
    root, base, other, data, adapter = world
    source = ShardSet(data / "train")
    assert source.tokenizer_sha256() is not None
    older = tmp_path / "older"
    shutil.copytree(data, older)
    for part in (older / "train").glob("part-*.arrow"):
        part.unlink()
    writer = ShardWriter(older / "train")  # the same rows as an older jora wrote them: no metadata at all
    for i in range(len(source)):
        writer.add(source.row(i))
    writer.close()
    assert ShardSet(older / "train").tokenizer_sha256() is None
    result = _invoke("train", "--model", base, "--data", older, tmp_path / "run", *TRAIN)
    assert result.exit_code == 0 and "record no tokenizer hash" in result.stderr, result.output


def test_a_negative_lora_alpha_is_refused_on_the_command_line_and_in_yaml(world, tmp_path):
    root, base, other, data, adapter = world
    for value in ("-1", "0", "nan"):
        result = _invoke("train", "--model", base, "--data", data, tmp_path / "run", *TRAIN, "--lora-alpha", value)
        assert result.exit_code == 2 and ("--lora-alpha" in result.stderr or "LoRA alpha" in result.stderr), \
            (value, result.output)
    assert not (tmp_path / "run").exists()
    with pytest.raises(JoraError, match="LoRA alpha must be positive"):
        LoraSettings(alpha=-1.0)
    config = tmp_path / "f.yaml"
    config.write_text("lora:\n  alpha: -1\n")
    with pytest.raises(JoraError, match="lora.alpha"):
        load_settings(config)


def test_lenient_skips_a_malformed_json_lines_line_and_strict_names_it(world, tmp_path, tokenizer_model):
    root, base, other, data, adapter = world
    lines = [json.dumps({"instruction": f"check {i}", "output": f"done {i}"}) for i in range(6)]
    lines.insert(2, '{"instruction": "broken", "output": ')  # line 3
    data_json = tmp_path / "data.jsonl"
    data_json.write_text("\n".join(lines) + "\n")
    strict = _tokenize(data_json, tmp_path / "strict", tokenizer_model)
    assert_clean_failure(strict, str(data_json), "line 3")
    assert not (tmp_path / "strict").exists() and no_leftovers(tmp_path, "strict")
    lenient = _invoke("tokenize", data_json, tmp_path / "out", "--tokenizer", tokenizer_model, "--lenient",
                      "--max-seq-len", "256", "--val-fraction", "0", "--workers", "1")
    assert lenient.exit_code == 0, lenient.output
    assert "examples in: 7, written: 6" in lenient.stdout and "1 invalid record: not valid JSON" in lenient.stdout
    assert "line 3" in lenient.stderr
    shards = ShardSet(tmp_path / "out" / "train")
    # the bad line keeps its place: the records after it keep their numbers
    assert sorted(shards.row(i).example_ids[0] for i in range(len(shards))) == [0, 1, 3, 4, 5, 6]


def test_set_into_a_value_is_one_line(tmp_path):
    config = tmp_path / "f.yaml"
    config.write_text("data:\n  path: x.json\n")
    assert_clean_failure(_invoke("run", "--config", config, "--set", "data.path.x=1"), "data.path.x", "data.path is")
    with pytest.raises(JoraError, match="cannot set data.path.deeper.x: data.path is a value"):
        load_settings(config, {"data.path.deeper.x": 1})
    raw = {"data": None}  # a section left empty in the YAML takes the key
    set_dotted(raw, "data.seed", 7)
    assert raw == {"data": {"seed": 7}}
