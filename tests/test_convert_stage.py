"""The convert stage as a user meets it: the `jora convert` command, caching, and bad input.

Every bad input must give one line naming the file and the problem, exit status 2, no traceback,
and leave no output (or the earlier output, intact) behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner

from pipeline.cli import cli
from stages.base import MANIFEST
from tests.conftest import VOCAB
from tests.oracles.checkpoints import (hf_to_meta_state_dict, meta_params, random_hf_llama,
                                       random_hf_llama_from_meta, train_tokenizer, write_hf_dir,
                                       write_meta_checkpoint)

JORA = Path(sys.executable).with_name("jora")


@pytest.fixture
def meta_dir(tmp_path, tokenizer_model) -> Path:
    params = meta_params(64, 2, 4, 2, 32)
    hf = random_hf_llama_from_meta(params, VOCAB, seed=1)
    sd = hf_to_meta_state_dict(hf.state_dict(), 4, 2)
    return write_meta_checkpoint(tmp_path / "meta", sd, params, 2, tokenizer_model)


def run_cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr starting with 'error:', naming what it must."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def file_identities(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime in ns, size) of `root` and of everything under it. A stage that runs again
    builds a new directory and renames it into place, so every inode changes; a skipped one leaves
    them all, and every mtime, as they were."""
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_size) for p in paths}


def test_convert_then_skip_then_rerun_on_change(meta_dir, tmp_path):
    out = tmp_path / "store"
    first = run_cli("convert", meta_dir, out, "--dtype", "fp32")
    assert first.exit_code == 0, first.output
    assert "converted" in first.stdout and (out / MANIFEST).is_file() and (out / "store.json").is_file()
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["inputs"]) == {"params.json", "tokenizer.model", "consolidated.00.pth",
                                       "consolidated.01.pth"}

    second = run_cli("convert", meta_dir, out, "--dtype", "fp32")
    assert second.exit_code == 0 and "skipped" in second.stdout

    # a changed setting re-runs
    third = run_cli("convert", meta_dir, out, "--dtype", "bf16")
    assert third.exit_code == 0 and "converted" in third.stdout
    assert json.loads((out / "store.json").read_text())["dtype"] == "bfloat16"

    # a changed input file re-runs, even with the same size and a restored mtime
    shard = meta_dir / "consolidated.01.pth"
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "norm_eps": 1e-6}))
    fourth = run_cli("convert", meta_dir, out, "--dtype", "bf16")
    assert fourth.exit_code == 0 and "converted" in fourth.stdout
    assert json.loads((out / "store.json").read_text())["config"]["norm_eps"] == 1e-6
    assert bytes(data) == shard.read_bytes() and stat.st_size == shard.stat().st_size

    # a deleted output file is noticed: the output is rebuilt, not taken as finished
    (out / "store.json").unlink()
    fifth = run_cli("convert", meta_dir, out, "--dtype", "bf16")
    assert fifth.exit_code == 0 and "converted" in fifth.stdout and (out / "store.json").is_file()
    assert no_leftovers(tmp_path, "store")


def test_rerun_of_the_console_script_reads_and_writes_nothing(meta_dir, tmp_path):
    """A rerun with unchanged inputs returns at once because it neither re-reads the checkpoint
    (hashes are reused while size and mtime match) nor converts again (the output stays as it was)."""
    out = tmp_path / "store"
    subprocess.run([JORA, "convert", meta_dir, out], check=True, capture_output=True)
    before = file_identities(out)
    manifest = (out / MANIFEST).read_bytes()
    # Overwrite a shard in place with zeros of the same size and put its mtime back: a rerun that
    # reads the shard (to hash or to convert it) fails on it or converts again; one that trusts the
    # recorded size and mtime, as a skip must, never notices.
    shard = meta_dir / "consolidated.01.pth"
    stat = shard.stat()
    with open(shard, "r+b") as f:
        f.write(bytes(stat.st_size))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rerun = subprocess.run([JORA, "convert", meta_dir, out], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped" in rerun.stdout and "skipped" in rerun.stderr
    assert file_identities(out) == before and (out / MANIFEST).read_bytes() == manifest
    assert no_leftovers(tmp_path, "store")  # no partial directory was made


def test_every_command_has_help():
    top = run_cli("--help")
    assert top.exit_code == 0 and "convert" in top.stdout
    for name, command in cli.commands.items():
        result = run_cli(name, "--help")
        assert result.exit_code == 0 and "Usage:" in result.stdout, name


def test_missing_params_json(meta_dir, tmp_path):
    (meta_dir / "params.json").unlink()
    out = tmp_path / "store"
    assert_clean_failure(run_cli("convert", meta_dir, out), "params.json", "not found")
    assert not out.exists() and no_leftovers(tmp_path, "store")


def test_shard_numbering_gap(meta_dir, tmp_path):
    (meta_dir / "consolidated.01.pth").rename(meta_dir / "consolidated.02.pth")
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "store"), str(meta_dir),
                         "missing consolidated.01.pth")
    assert not (tmp_path / "store").exists()


def test_missing_shard_gives_shape_error(meta_dir, tmp_path):
    """One shard of two deleted: the numbering looks fine, but the weights are half as wide."""
    (meta_dir / "consolidated.01.pth").unlink()
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "store"), "consolidated.00.pth")
    assert not (tmp_path / "store").exists() and no_leftovers(tmp_path, "store")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flipped-bytes"])
def test_corrupt_shard(meta_dir, tmp_path, damage):
    shard = meta_dir / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:  # a few bytes inside the tensor data: the zip still opens, only the CRC tells
        data[len(data) // 3: len(data) // 3 + 8] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "store"), "consolidated.01.pth")
    assert not (tmp_path / "store").exists() and no_leftovers(tmp_path, "store")


def test_shapes_disagree_with_params(meta_dir, tmp_path):
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "multiple_of": 128}))  # ffn 256, weights 192
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "store"), "gate_proj", "model settings")
    assert not (tmp_path / "store").exists() and no_leftovers(tmp_path, "store")


def test_tokenizer_of_another_model(meta_dir, tmp_path):
    train_tokenizer(meta_dir / "tokenizer.model", vocab_size=400)
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "store"), "tokenizer.model", "400 ids",
                         f"{VOCAB} rows")


def test_hf_directory_of_another_architecture(tmp_path):
    src = tmp_path / "mistral"
    transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2).save_pretrained(src)
    assert_clean_failure(run_cli("convert", src, tmp_path / "store"), "config.json", "not a Llama model")


def test_hf_directory_without_weights(tmp_path, tokenizer_model):
    src = write_hf_dir(random_hf_llama(VOCAB, 32, 1, 2, 2, 48), tmp_path / "hf", tokenizer_model)
    (src / "model.safetensors").unlink()
    assert_clean_failure(run_cli("convert", src, tmp_path / "store"), str(src), "model.safetensors")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run_cli("convert", tmp_path / "empty", tmp_path / "store"), "neither Meta")
    assert_clean_failure(run_cli("convert", tmp_path / "nowhere", tmp_path / "store"), "not found")


def test_output_that_is_not_ours_is_left_alone(meta_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_clean_failure(run_cli("convert", meta_dir, out), str(out), "not made by jora")
    assert (out / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "file"), "not a directory")


def test_failed_rebuild_keeps_the_previous_output(meta_dir, tmp_path):
    out = tmp_path / "store"
    assert run_cli("convert", meta_dir, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = meta_dir / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert_clean_failure(run_cli("convert", meta_dir, out), "consolidated.00.pth")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert no_leftovers(tmp_path, "store")


def test_full_disk_is_one_line_and_keeps_the_previous_output(meta_dir, tmp_path, monkeypatch):
    out = tmp_path / "store"
    assert run_cli("convert", meta_dir, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    from jora_model.formats import safetensors_io

    def full(self, name, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io.PlannedWriter, "write", full)
    assert_clean_failure(run_cli("convert", meta_dir, out, "--dtype", "fp32"), "no space left", str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert no_leftovers(tmp_path, "store")


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["--debug", "convert", str(tmp_path / "empty"), str(tmp_path / "o")])
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "JoraError"


def test_stale_partial_directory_is_never_taken_for_output(meta_dir, tmp_path):
    """A run killed mid-write leaves `.store.partial-PID-*`; the next run ignores and sweeps it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    partial = tmp_path / f".store.partial-{dead}-deadbeef"
    partial.mkdir()
    (partial / "store.json").write_text("{half")
    result = run_cli("convert", meta_dir, tmp_path / "store")
    assert result.exit_code == 0 and "converted" in result.stdout
    assert not partial.exists()
    shutil.rmtree(tmp_path / "store")


def test_a_second_writer_of_the_same_output_is_refused(meta_dir, tmp_path):
    """Two `jora convert` into one output used to both succeed (the second rename won). While another
    process holds the output's lock, a second command is refused in one line and writes nothing."""
    import multiprocessing

    out = tmp_path / "store"
    context = multiprocessing.get_context("spawn")
    locked, done = context.Event(), context.Event()
    holder = context.Process(target=_hold_output_lock, args=(str(out), locked, done))
    holder.start()
    try:
        assert locked.wait(60)
        assert_clean_failure(run_cli("convert", meta_dir, out), "another jora process is writing this output",
                             str(out))
        assert not out.exists()
    finally:
        done.set()
        holder.join(60)
    assert run_cli("convert", meta_dir, out).exit_code == 0  # the lock went with its holder ...
    assert no_leftovers(tmp_path, "store")  # ... and leaves no file behind


def _hold_output_lock(out: str, locked, done) -> None:
    from stages.base import _OutputLock

    guard = _OutputLock(Path(out))
    locked.set()
    done.wait(60)
    guard.release()


def test_a_publish_killed_between_its_renames_is_restored(meta_dir, tmp_path):
    """_move_into_place renames the old output aside, then the new one in. Killed between the two, only
    `.NAME.old-*` holds the output: the next run puts it back (and, up to date, skips); a leftover old
    copy beside a finished output is swept."""
    out = tmp_path / "store"
    assert run_cli("convert", meta_dir, out).exit_code == 0
    before = file_identities(out)
    aside = tmp_path / ".store.old-0badc0de"
    out.rename(aside)
    again = run_cli("convert", meta_dir, out)
    assert again.exit_code == 0 and "skipped" in again.output, again.output
    assert file_identities(out) == before and not aside.exists()
    (tmp_path / ".store.old-12345678").mkdir()
    assert run_cli("convert", meta_dir, out).exit_code == 0
    assert no_leftovers(tmp_path, "store") and file_identities(out) == before


def test_an_output_that_cannot_be_written_is_one_line(meta_dir, tmp_path, monkeypatch):
    """A read-only filesystem and a directory without write permission, injected where the stage first
    writes beside its output (the tests run as root, whom permissions do not stop)."""
    import errno

    import stages.base

    def read_only(out_dir):
        raise OSError(errno.EROFS, "Read-only file system", str(out_dir.parent / ".store.lock"))

    monkeypatch.setattr(stages.base, "_OutputLock", read_only)
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "store"), "cannot write the convert output here",
                         "Read-only file system", str(tmp_path / "store"))
    real_mkdir = Path.mkdir

    def no_permission(self, *args, **kwargs):
        if self == tmp_path / "sub":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_permission)
    assert_clean_failure(run_cli("convert", meta_dir, tmp_path / "sub" / "store"),
                         "cannot write the convert output here", "Permission denied")
    assert not (tmp_path / "store").exists() and not (tmp_path / "sub").exists()
