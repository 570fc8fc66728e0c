"""The catalogue of bad input and faults (issue 22): every stage, `jora run` and the GUI, each through the
real `jora` console script in a child process, as a user meets it.

Every case asserts the same five things:
- the exit status (2 for bad input, 143 for SIGTERM);
- exactly one line, "error: ...", naming the file (where there is one) and the problem, and for a stage
  command nothing else on the console;
- no traceback;
- nothing written or overwritten: every file and directory under the shared inputs and the case's own
  directory has the inode, mtime and size it had before (a rewritten file gets a new mtime, a
  republished directory new inodes);
- no process left behind: every process started for the case carries a marker in its environment, and
  none with it is alive once the command has ended (children inherit the environment whatever their
  session or parent, so a server or worker that escaped its parent is still found).
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from stages.export import export
from stages.merge import merge
from stages.tokenize import TokenizeSettings, tokenize
from tests.conftest import VOCAB
from tests.oracles.checkpoints import (hf_to_meta_state_dict, meta_params, random_hf_llama_from_meta,
                                       train_tokenizer, write_meta_checkpoint)
from tests.processes import command_line, descendants, marked
from tests.test_convert_stage import file_identities
from tests.train_helpers import tiny_data, tiny_run, tiny_store

JORA = Path(sys.executable).with_name("jora")
MARK = "JORA_CATALOGUE_CASE"  # in the environment of every process a case starts


@dataclasses.dataclass(frozen=True)
class World:
    """Finished inputs every case may read and none may change: a Meta checkpoint, an HF checkpoint and
    its store, a second base of the same shapes, data and its shards, an adapter, the merged model."""
    root: Path
    meta: Path
    hf: Path
    store: Path
    other: Path
    other_hf: Path
    data_json: Path
    shards: Path
    run: Path
    merged: Path
    tokenizer: Path
    foreign_shards: Path  # the same data, made by another tokenizer whose ids fit the model


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_model) -> World:
    root = tmp_path_factory.mktemp("catalogue")
    params = meta_params(64, 2, 4, 2, 32)
    state = hf_to_meta_state_dict(random_hf_llama_from_meta(params, VOCAB, seed=1).state_dict(), 4, 2)
    meta = write_meta_checkpoint(root / "meta", state, params, 2, tokenizer_model)
    _, store = tiny_store(root, tokenizer_model, seed=0)
    _, other = tiny_store(root, tokenizer_model, seed=1)
    shards = tiny_data(root, tokenizer_model)
    run = tiny_run(store, shards, root / "run")
    merged = merge(store, run, root / "merged", progress=False).out_dir
    other_hf = export(other, root / "other-hf", verify=False).out_dir
    foreign = train_tokenizer(root / "foreign" / "tokenizer.model", vocab_size=310)
    foreign_shards = tokenize(root / "data-0.json", root / "foreign-shards", foreign,
                              TokenizeSettings(max_seq_len=256), workers=1).out_dir
    return World(root, meta, root / "hf-0-4-2", store, other, other_hf, root / "data-0.json", shards, run, merged,
                 tokenizer_model, foreign_shards)


@dataclasses.dataclass
class Call:
    """One case: `jora ARGS`, and what its one line must say. `names` is the file the line names (None
    where none is involved, e.g. a missing extra); `alone`: the line is all the command prints (a
    stage command), else other lines may come before it (`jora run`'s stage lines, Prefect's log)."""
    args: list
    names: str | Path | None
    says: str
    status: int = 2
    alone: bool = True
    env: dict = dataclasses.field(default_factory=dict)
    written: tuple = ()  # paths the command may create (a Prefect home); everything else stays
    fault: Callable | None = None  # called with the running process, e.g. to send it SIGTERM
    holding: Path | None = None  # a lock file this test holds (flock) while the command runs


# --- building blocks of the cases -----------------------------------------------------------------

def _copy(path: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(path, tmp / path.name))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _records(tmp: Path, w: World, change: Callable[[list], object], name: str = "data.json") -> Path:
    records = json.loads(w.data_json.read_text())
    change(records)
    (tmp / name).write_text(json.dumps(records))
    return tmp / name


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _train(w: World, tmp: Path, *extra, data: Path | None = None) -> list:
    return ["train", "--model", w.store, "--data", data or w.shards, tmp / "out", "--lora-r", "4", "--batch-size",
            "2", "--grad-accum", "1", "--max-seq-len", "256", "--max-steps", "1", "--eval-every", "0", *extra]


def _run_config(w: World, tmp: Path, **changes) -> Path:
    import yaml

    raw = {"workdir": str(tmp / "work"), "model": {"checkpoint": str(w.hf)},
           "data": {"path": str(w.data_json), "max_seq_len": 256, "val_fraction": 0.2},
           "lora": {"r": 4, "alpha": 8}, "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 1, "eval_every": 0},
           "export": {"verify": False}}
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[key] = value
    return _write(tmp / "run.yaml", yaml.safe_dump(raw))


# Importing Prefect makes its home directory (empty): nothing of the user's. Refused before the flow,
# Prefect's temporary server never starts, so its database is never made in it.
PREFECT_HOME = ("prefect",)


def _run(w: World, tmp: Path, says: str, names=None, **changes) -> Call:
    """`jora run` on a config with `changes`, refused before Prefect starts (PREFECT_HOME stays empty)."""
    return Call(["run", "--config", _run_config(w, tmp, **changes)], names, says, alone=False,
                written=PREFECT_HOME)


def _held_port() -> tuple[socket.socket, int]:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held, held.getsockname()[1]


def _without_gradio(tmp: Path) -> dict:
    """An environment where `import gradio` fails as it does without the gui extra."""
    shim = tmp / "no-gradio" / "gradio"
    shim.mkdir(parents=True)
    _write(shim / "__init__.py", "raise ModuleNotFoundError(\"No module named 'gradio'\", name='gradio')\n")
    return {"PYTHONPATH": str(shim.parent)}


def _sigterm_when(ready: Callable[[int], bool]) -> Callable:
    def fault(process: subprocess.Popen) -> None:
        deadline = time.monotonic() + 300
        while not ready(process.pid) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
    return fault


def _workers_busy(pid: int) -> bool:
    return sum("spawn_main" in command_line(child) for child in descendants(pid)) >= 2


# --- the catalogue: case name -> (world, the case's own directory) -> Call --------------------------

# sources (and outputs) the convert cases damage: copies under the case's directory


def _src_meta(tmp, w, **params):
    src = _copy(w.meta, tmp)
    _edit_json(src / "params.json", **params)
    return src


def _src_hf(tmp, w, **config):
    src = _copy(w.hf, tmp)
    _edit_json(src / "config.json", **config)
    return src


def _src_damaged_shard(tmp, w):
    src = _copy(w.meta, tmp)
    shard = src / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return src


def _src_renamed_shard(tmp, w):
    src = _copy(w.meta, tmp)
    (src / "consolidated.01.pth").rename(src / "consolidated.02.pth")
    return src


def _src_other_tokenizer(tmp, w):
    src = _copy(w.meta, tmp)
    train_tokenizer(src / "tokenizer.model", vocab_size=400)
    return src


def _src_no_params(tmp, w):
    src = _copy(w.meta, tmp)
    (src / "params.json").unlink()
    return src


def _src_no_weights(tmp, w):
    src = _copy(w.hf, tmp)
    (src / "model.safetensors").unlink()
    return src


def _src_junk(tmp, w):
    _write((tmp / "junk").mkdir() or tmp / "junk" / "weights.bin", b"\0" * 16)
    return tmp / "junk"


def _src_precious(tmp, w):
    _write((tmp / "out").mkdir() or tmp / "out" / "notes.txt", "mine")
    return tmp / "out"


def _convert_cases() -> dict[str, Callable[[World, Path], Call]]:
    def convert(src_of, says, names_of=lambda src, tmp: src, out_of=lambda tmp: tmp / "out", holding=None):
        def case(w, tmp):
            src = src_of(tmp, w)
            out = out_of(tmp)
            return Call(["convert", src, out], names_of(src, tmp), says,
                        holding=holding(tmp) if holding else None)
        return case

    return {
        "convert: no checkpoint there": convert(lambda tmp, w: tmp / "nowhere", "source checkpoint not found"),
        "convert: not a checkpoint": convert(_src_junk, "neither Meta's layout"),
        "convert: Meta without params.json": convert(_src_no_params, "not found", lambda s, t: s / "params.json"),
        "convert: Meta shard numbering gap": convert(_src_renamed_shard, "missing consolidated.01.pth"),
        "convert: Meta shard cut short": convert(_src_damaged_shard, "not a readable torch checkpoint",
                                                 lambda s, t: s / "consolidated.01.pth"),
        "convert: Meta shapes disagree with params.json": convert(
            lambda tmp, w: _src_meta(tmp, w, multiple_of=128), "model settings"),
        "convert: Meta tokenizer of another model": convert(_src_other_tokenizer, "400 ids",
                                                           lambda s, t: s / "tokenizer.model"),
        "convert: params.json norm_eps not a number": convert(
            lambda tmp, w: _src_meta(tmp, w, norm_eps="abc"), "norm_eps", lambda s, t: s / "params.json"),
        "convert: params.json rope_theta null": convert(
            lambda tmp, w: _src_meta(tmp, w, rope_theta=None), "rope_theta", lambda s, t: s / "params.json"),
        "convert: config.json rms_norm_eps not a number": convert(
            lambda tmp, w: _src_hf(tmp, w, rms_norm_eps="tiny"), "rms_norm_eps", lambda s, t: s / "config.json"),
        "convert: HF model of another architecture": convert(
            lambda tmp, w: _src_hf(tmp, w, model_type="mistral", architectures=["MistralForCausalLM"],
                                   sliding_window=64), "not a Llama model", lambda s, t: s / "config.json"),
        "convert: HF directory without weights": convert(_src_no_weights, "model.safetensors"),
        "convert: output that is not ours": convert(lambda tmp, w: w.meta, "not", lambda s, t: t / "out",
                                                    out_of=lambda tmp: _src_precious(tmp, None)),
        "convert: output under a file": convert(lambda tmp, w: w.meta, "a part of the path is a file",
                                                lambda s, t: t / "afile",
                                                out_of=lambda tmp: _write(tmp / "afile", "x") / "out"),
        "convert: output on a read-only filesystem": convert(lambda tmp, w: w.meta, "cannot write the convert output",
                                                             lambda s, t: "/sys/jora-out",
                                                             out_of=lambda tmp: Path("/sys/jora-out")),
        "convert: output being written by another process": convert(
            lambda tmp, w: w.meta, "another jora process is writing this output", lambda s, t: t / "out",
            holding=lambda tmp: tmp / ".out.lock"),
    }


def _tokenize_cases() -> dict[str, Callable[[World, Path], Call]]:
    def tokenize(data_of, says, names_of=lambda data, w: data, *extra, tokenizer_of=lambda w, tmp: w.tokenizer):
        def case(w, tmp):
            data = data_of(w, tmp)
            return Call(["tokenize", data, tmp / "out", "--tokenizer", tokenizer_of(w, tmp), "--workers", "1",
                         "--max-seq-len", "256", *extra], names_of(data, w), says)
        return case

    def drop(key):
        return lambda w, tmp: _records(tmp, w, lambda r: r[2].pop(key))

    return {
        "tokenize: no data file": tokenize(lambda w, tmp: tmp / "absent.json", "not found"),
        "tokenize: data is not JSON": tokenize(lambda w, tmp: _write(tmp / "data.json", "[{\"instruction\": "),
                                               "JSON"),
        "tokenize: empty data file": tokenize(lambda w, tmp: _write(tmp / "data.json", ""), "empty"),
        "tokenize: record without output": tokenize(drop("output"), "record 2: missing 'output'"),
        "tokenize: output that is not text": tokenize(lambda w, tmp: _records(
            tmp, w, lambda r: r[1].update(output=7)), "record 1"),
        "tokenize: malformed JSON Lines line": tokenize(lambda w, tmp: _write(
            tmp / "data.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n'), "line 2"),
        "tokenize: no tokenizer file": tokenize(lambda w, tmp: w.data_json, "not found",
                                                lambda d, w: "absent.model",
                                                tokenizer_of=lambda w, tmp: tmp / "absent.model"),
        "tokenize: tokenizer file of no known kind": tokenize(
            lambda w, tmp: w.data_json, "not a SentencePiece model nor a tiktoken", lambda d, w: "garbage.model",
            tokenizer_of=lambda w, tmp: _write(tmp / "garbage.model", os.urandom(256))),
        "tokenize: chat template the tokenizer cannot spell": lambda w, tmp: Call(
            ["tokenize", w.data_json, tmp / "out", "--tokenizer", w.tokenizer, "--template", "llama3-chat",
             "--workers", "1"], w.tokenizer, "llama3-chat"),
    }


def _train_cases() -> dict[str, Callable[[World, Path], Call]]:
    def with_shards(shards_of, says):
        return lambda w, tmp: Call(_train(w, tmp, data=shards_of(w, tmp)), shards_of(w, tmp), says)

    return {
        "train: no parameter store": lambda w, tmp: Call(_train(dataclasses.replace(w, store=tmp / "none"), tmp),
                                                         tmp / "none", "parameter store not found"),
        "train: no shards": with_shards(lambda w, tmp: tmp / "none", "not found"),
        "train: shards of another tokenizer": with_shards(lambda w, tmp: w.foreign_shards, "another tokenizer"),
        "train: mesh larger than the machine": lambda w, tmp: Call(_train(w, tmp, "--mesh", "data=1,model=2"), None,
                                                                   "needs 2 devices"),
        "train: negative --lora-alpha": lambda w, tmp: Call(_train(w, tmp, "--lora-alpha", "-3"), None,
                                                            "--lora-alpha"),
        # the run keeps its checkpoints (in .out.work-*) to be looked at; it publishes nothing
        "train: diverges at lr 1e8": lambda w, tmp: Call(_train(w, tmp, "--lr", "1e8", "--max-steps", "30"),
                                                         tmp / "out", "Try a lower --lr", written=(".out.work-*",)),
    }


def _adapter_cases() -> dict[str, Callable[[World, Path], Call]]:
    """merge, export, export-adapter and generate: the commands that apply an adapter to a base."""
    def not_an_adapter(tmp, w):
        (tmp / "adapter").mkdir()
        return tmp / "adapter"

    return {
        "merge: adapter of another base": lambda w, tmp: Call(
            ["merge", "--model", w.other, "--adapter", w.run, tmp / "out"], w.run / "adapter", "trained on base"),
        "merge: the merged model as the base of its own adapter": lambda w, tmp: Call(
            ["merge", "--model", w.merged, "--adapter", w.run, tmp / "out"], w.merged, "twice"),
        "merge: no adapter there": lambda w, tmp: Call(
            ["merge", "--model", w.store, "--adapter", tmp / "none", tmp / "out"], tmp / "none", "not found"),
        "merge: a directory that is no adapter": lambda w, tmp: Call(
            ["merge", "--model", w.store, "--adapter", not_an_adapter(tmp, w), tmp / "out"], tmp / "adapter",
            "not a jora adapter"),
        "export: store not found": lambda w, tmp: Call(["export", tmp / "none", tmp / "out", "--no-verify"],
                                                       tmp / "none", "not found"),
        "export: adapter of another base": lambda w, tmp: Call(
            ["export", w.other, tmp / "out", "--adapter", w.run, "--no-verify"], w.run / "adapter", "trained on base"),
        "export-adapter: adapter of another base": lambda w, tmp: Call(
            ["export-adapter", "--model", w.other, w.run, tmp / "out", "--no-verify"], w.run / "adapter",
            "trained on base"),
        "export-adapter: --base-hf of another base": lambda w, tmp: Call(
            ["export-adapter", "--model", w.store, w.run, tmp / "out", "--no-verify", "--base-hf", w.other_hf],
            w.other_hf, "export of another parameter store"),
        "generate: adapter of another base": lambda w, tmp: Call(
            ["generate", "--model", w.other, "--adapter", w.run, "--prompt", "check", "--max-new-tokens", "2"],
            w.run / "adapter", "trained on base"),
        "generate: requests file not found": lambda w, tmp: Call(
            ["generate", "--model", w.store, "--data", tmp / "none.json"], tmp / "none.json", "not found"),
    }


def _evaluate_cases() -> dict[str, Callable[[World, Path], Call]]:
    def evaluate(golden_of, says):
        def case(w, tmp):
            golden = golden_of(w, tmp)
            return Call(["evaluate", "--model", w.store, "--adapter", w.run, "--data", golden, tmp / "out"], golden,
                        says)
        return case

    return {
        "evaluate: empty golden set": evaluate(lambda w, tmp: _write(tmp / "golden.json", ""), "empty"),
        "evaluate: golden set is not JSON": evaluate(lambda w, tmp: _write(tmp / "golden.json", "[{"), "invalid JSON"),
        "evaluate: golden record without output": evaluate(
            lambda w, tmp: _records(tmp, w, lambda r: r[1].pop("output"), "golden.json"), "record 1: missing 'output'"),
        "evaluate: golden shards of another tokenizer": evaluate(lambda w, tmp: w.foreign_shards, "another tokenizer"),
        "evaluate: adapter of another base": lambda w, tmp: Call(
            ["evaluate", "--model", w.other, "--adapter", w.run, "--data", w.data_json, tmp / "out"],
            w.run / "adapter", "trained on base"),
    }


def _run_cases() -> dict[str, Callable[[World, Path], Call]]:
    def lineage(w, tmp):
        _write((tmp / "work").mkdir() or tmp / "work" / "lineage.json", '{"mine": true}')
        return _run(w, tmp, "not a lineage file jora wrote", tmp / "work" / "lineage.json")

    def busy(w, tmp):
        call = _run(w, tmp, "another jora run", tmp / "work")
        (tmp / "work").mkdir()
        return dataclasses.replace(call, holding=tmp / "work" / ".jora-run.lock")

    def in_flow(w, tmp):
        """Found by the tokenize stage inside the flow, after convert ran: convert's output is finished
        work (it stays), tokenize's is not written."""
        data = _records(tmp, w, lambda r: r[3].pop("output"))
        call = _run(w, tmp, "record 3: missing 'output'", data, **{"data.path": str(data)})
        return dataclasses.replace(call, written=("prefect", "prefect/*", "work", "work/store", "work/store/*",
                                                  "work/.jora-run.lock"))

    return {
        "run: no config file": lambda w, tmp: Call(["run", "--config", tmp / "none.yaml"], None, "none.yaml",
                                                   written=PREFECT_HOME),
        "run: config is not YAML": lambda w, tmp: Call(["run", "--config", _write(tmp / "c.yaml", "a: [b")],
                                                       tmp / "c.yaml", "not valid YAML", written=PREFECT_HOME),
        "run: config with an unknown key": lambda w, tmp: Call(
            ["run", "--config", _run_config(w, tmp, **{"train.learning_rate": 1e-3})], tmp / "run.yaml",
            "learning_rate", written=PREFECT_HOME),
        "run: --set into a value": lambda w, tmp: Call(
            ["run", "--config", _run_config(w, tmp), "--set", "data.path.x=1"], None, "data.path",
            written=PREFECT_HOME),
        "run: --set of an unknown key": lambda w, tmp: Call(
            ["run", "--config", _run_config(w, tmp), "--set", "train.nonsense=1"], None, "nonsense",
            written=PREFECT_HOME),
        "run: --demo with --config": lambda w, tmp: Call(["run", "--demo", "--config", _run_config(w, tmp)], None,
                                                         "exactly one of --demo or --config", written=PREFECT_HOME),
        "run: no checkpoint there": lambda w, tmp: _run(w, tmp, "source checkpoint not found", tmp / "none",
                                                        **{"model.checkpoint": str(tmp / "none")}),
        "run: no data file": lambda w, tmp: _run(w, tmp, "data file not found", tmp / "none.json",
                                                 **{"data.path": str(tmp / "none.json")}),
        "run: empty data file": lambda w, tmp: _run(w, tmp, "data file is empty", tmp / "e.json",
                                                    **{"data.path": str(_write(tmp / "e.json", ""))}),
        "run: mesh larger than the machine": lambda w, tmp: _run(w, tmp, "needs 1024 devices",
                                                                 **{"train.mesh": "model=1024"}),
        "run: golden set not found": lambda w, tmp: _run(w, tmp, "golden set (eval.data) not found", tmp / "g.json",
                                                         **{"eval.data": str(tmp / "g.json")}),
        "run: golden record without output": lambda w, tmp: _run(
            w, tmp, "golden set record 1: missing 'output'", tmp / "golden.json",
            **{"eval.data": str(_records(tmp, w, lambda r: r[1].pop("output"), "golden.json"))}),
        "run: an eval metric that does not exist": lambda w, tmp: _run(w, tmp, "eval.metric", tmp / "run.yaml",
                                                                       **{"eval.metric": "bleu"}),
        "run: the gate without a golden set": lambda w, tmp: _run(w, tmp, "needs a golden set",
                                                                  **{"data.val_fraction": 0.0}),
        "run: work directory busy": busy,
        "run: lineage.json jora did not write": lineage,
        "run: record without output, found inside the flow": in_flow,
    }


def _gui_cases() -> dict[str, Callable[[World, Path], Call]]:
    def busy_port(w, tmp):
        held, port = _held_port()
        call = Call(["gui", "--port", port], None, f"port {port}")
        call.env["_held"] = held  # kept open while the command runs (taken out of the environment)
        return call

    return {
        "gui: without the gui extra": lambda w, tmp: Call(["gui"], None, "pip install 'jora[gui]'",
                                                          env=_without_gradio(tmp)),
        "gui: port in use": busy_port,
        "gui: --workdir is a file": lambda w, tmp: Call(["gui", "--workdir", _write(tmp / "f", "x")], tmp / "f",
                                                        "--workdir"),
        "server: port in use": lambda w, tmp: (lambda held_port: Call(
            ["server", "--port", held_port[1], "--no-ui"], None, f"port {held_port[1]}",
            env={"_held": held_port[0]}, written=("prefect", "prefect/*")))(
            _held_port()),
    }


def _fault_cases() -> dict[str, Callable[[World, Path], Call]]:
    def tokenize_stopped(w, tmp):
        data = _write(tmp / "many.json", json.dumps(json.loads(w.data_json.read_text()) * 4000))
        return Call(["tokenize", data, tmp / "out", "--tokenizer", w.tokenizer, "--workers", "2"], None,
                    "stopped by SIGTERM; finished outputs are intact", status=143,
                    fault=_sigterm_when(_workers_busy))

    return {"tokenize: SIGTERM while its workers run": tokenize_stopped}


CASES = {**_convert_cases(), **_tokenize_cases(), **_train_cases(), **_adapter_cases(), **_evaluate_cases(),
         **_run_cases(), **_gui_cases(), **_fault_cases()}


# --- the checks -------------------------------------------------------------------------------------

def _state(roots: list[Path], allowed: tuple, tmp: Path) -> dict[str, tuple]:
    """file_identities of every root, leaving out what the case may write (globs under its directory).
    A directory keeps only its inode: its mtime moves when a lock or a partial output beside the
    output comes and goes, and what it holds is compared entry by entry."""
    state = {}
    for root in roots:
        for name, identity in (file_identities(root) if root.exists() else {}).items():
            path = root / name
            if not _allowed(path, allowed, tmp):
                state[str(path)] = identity[:1] if path.is_dir() else identity
    return state


def _allowed(path: Path, allowed: tuple, tmp: Path) -> bool:
    """`path` is one of the `allowed` globs (relative to `tmp`), or lies inside a directory that is;
    a bare "prefect" allows that directory but not what is in it."""
    if tmp not in path.parents and path != tmp:
        return False
    relative = path.relative_to(tmp)
    if any(fnmatch.fnmatch(str(relative), pattern) for pattern in allowed):
        return True
    return any(fnmatch.fnmatch(str(parent), pattern) and pattern.endswith("*")
               for parent in relative.parents for pattern in allowed)


@pytest.fixture
def holding():
    """flock on a path for the length of the case (another process's lock, as jora takes its own)."""
    held = []

    def hold(path: Path):
        handle = open(path, "a+")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(handle)
    yield hold
    for handle in held:
        handle.close()


def test_the_catalogue_is_large_and_spans_every_command():
    assert len(CASES) >= 40
    commands = {name.split(":")[0] for name in CASES}
    assert {"convert", "tokenize", "train", "merge", "export", "export-adapter", "generate", "evaluate", "run",
            "gui"} <= commands


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, world, tmp_path, holding):
    call = CASES[case](world, tmp_path)
    held = call.env.pop("_held", None)  # a socket holding a port, kept open until the command ends
    if call.holding is not None:
        holding(call.holding)
    token = uuid.uuid4().hex
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(tmp_path / "prefect"), **call.env, MARK: token}
    roots = [world.root, tmp_path]
    before = _state(roots, call.written, tmp_path)
    process = subprocess.Popen([JORA, *map(str, call.args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        if call.fault is not None:
            call.fault(process)
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        if held is not None:
            held.close()
    output = out + err
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ") or line.startswith("stopped by SIGTERM")]
    assert process.returncode == call.status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    print(errors[0])  # the catalogue's lines, to read with pytest -rP
    assert call.says in errors[0] and (call.names is None or str(call.names) in errors[0]), (errors[0], call)
    if call.alone:
        assert lines == errors, output[-3000:]
    deadline = time.monotonic() + 60  # children told by the kernel that their parent died take a moment
    while (left := marked(f"{MARK}={token}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    assert _state(roots, call.written, tmp_path) == before


def test_bad_input_in_a_run_launched_from_the_gui(world, tmp_path, monkeypatch):
    """The GUI's Launch runs `jora run` in a child: its failure is the one line the page shows, with no
    traceback in the page's log, nothing written but the settings file the GUI writes for the run, and
    no process left."""
    from pipeline.gui.runs import LocalRun
    from pipeline.settings import load_settings

    token = uuid.uuid4().hex
    monkeypatch.setenv(MARK, token)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    missing = tmp_path / "none.json"
    settings = load_settings(_run_config(world, tmp_path, **{"data.path": str(missing)}))
    allowed = PREFECT_HOME + ("work", "work/gui-settings.yaml")
    before = _state([world.root, tmp_path], allowed, tmp_path)
    run = LocalRun(settings)
    run.process.wait(timeout=600)
    deadline = time.monotonic() + 60  # the thread reading the child's output ends the run's view
    while run.active and time.monotonic() < deadline:
        time.sleep(0.1)
    view = run.view()
    assert view.status == "failed" and view.error == f"{missing}: data file not found", view
    assert not any("Traceback" in line for line in view.log), view.log
    assert [line for line in view.log if line.startswith("error: ")] == [f"error: {view.error}"]
    assert not marked(f"{MARK}={token}")
    assert _state([world.root, tmp_path], allowed, tmp_path) == before


def test_the_checks_see_a_process_left_behind_and_a_file_written(tmp_path):
    """The catalogue's own checks can fail: an orphan (its parent gone, adopted elsewhere) is found by
    its marker, and a file written or rewritten changes the state."""
    token = uuid.uuid4().hex
    subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], env={**os.environ, MARK: token}, check=True)
    left = marked(f"{MARK}={token}")
    assert len(left) == 1 and "sleep 60" in next(iter(left.values()))
    os.kill(next(iter(left)), signal.SIGKILL)
    (tmp_path / "kept").write_text("a")
    before = _state([tmp_path], (), tmp_path)
    (tmp_path / "kept").write_text("b")
    assert _state([tmp_path], (), tmp_path) != before
    (tmp_path / "new").write_text("c")
    assert _state([tmp_path], (), tmp_path).keys() != before.keys()
