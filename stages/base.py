"""What every stage shares: a manifest of what an output was made from, an output directory that
appears all at once, and skipping when nothing changed.

An output directory is finished only when it holds `jora-manifest.json`, written last inside a
private `.NAME.partial-PID-XXXX` directory that is then renamed into place. A crash leaves at most a
partial directory, which is never read as output and is swept away by the next run. While a command
writes an output it holds `.NAME.lock` beside it, so a second writer is refused instead of racing it.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from jora_model.errors import JoraError

MANIFEST = "jora-manifest.json"
log = logging.getLogger("jora")


@dataclasses.dataclass(frozen=True)
class StageResult:
    stage: str
    out_dir: Path
    skipped: bool  # True when a finished output with the same key was already there
    key: str  # content hash of inputs, settings and code version
    manifest: dict[str, Any]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise JoraError("corrupt stage manifest; delete the directory to rebuild it", path) from None
    return manifest if isinstance(manifest, dict) else None


def hash_inputs(inputs: dict[str, Path], previous: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Content hashes of the input files. A file whose path, size and mtime match what the previous
    manifest recorded keeps its recorded hash (as make and git do), so a rerun over a 130 GB checkpoint
    does not re-read it; any edit changes the mtime and so gets rehashed."""
    old = (previous or {}).get("inputs", {})
    out: dict[str, dict[str, Any]] = {}
    for name, path in sorted(inputs.items()):
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise JoraError("input file not found", path) from None
        record = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        cached = old.get(name)
        if cached and all(cached.get(k) == v for k, v in record.items()) and "sha256" in cached:
            record["sha256"] = cached["sha256"]
        else:
            record["sha256"] = file_sha256(path)
        out[name] = record
    return out


def cache_key(stage: str, code_version: str, settings: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> str:
    """Depends on file contents and names, not on where the files live or when they were touched."""
    material = {"stage": stage, "code_version": code_version, "settings": settings,
                "inputs": {name: rec["sha256"] for name, rec in inputs.items()}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _outputs_intact(out_dir: Path, manifest: dict[str, Any]) -> bool:
    for rel, size in manifest.get("outputs", {}).items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _check_ours(out_dir: Path, stage: str) -> dict[str, Any] | None:
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise JoraError("output path exists and is not a directory", out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        if any(out_dir.iterdir()):
            raise JoraError("output directory exists, is not empty and was not made by jora; "
                            "refusing to overwrite it", out_dir)
        return None
    if manifest.get("stage") != stage:
        raise JoraError(f"output directory holds a jora {manifest.get('stage')!r} output, not {stage!r}", out_dir)
    return manifest


def _sweep_partials(out_dir: Path) -> None:
    """Remove partial directories of runs that died (their process is gone)."""
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        try:
            pid = int(path.name.rsplit(".partial-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _writable(make: Callable[[], Any], stage: str, out_dir: Path) -> Any:
    """`make()`, the first write beside an output; a path that cannot be written (no permission, a
    read-only filesystem, a file where a directory must be, a name too long) is one line, before any
    work is done."""
    try:
        return make()
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                             errno.ENAMETOOLONG, errno.ELOOP):
            raise
        reason = "a part of the path is a file, not a directory" if exc.errno in (errno.EEXIST, errno.ENOTDIR) \
            else exc.strerror
        raise JoraError(f"cannot write the {stage} output here: {reason}", out_dir) from None


def _restore_interrupted_swap(out_dir: Path) -> None:
    """A publish killed between its two renames (_move_into_place) leaves the previous output under
    `.NAME.old-*` and nothing at NAME: put it back. Once NAME is there, an old one is only litter."""
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists():
        os.rename(olds.pop(), out_dir)
        log.info("restored %s, whose replacement was interrupted", out_dir)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


class _OutputLock:
    """An exclusive lock beside an output (`.NAME.lock`), removed when released so finished outputs
    leave nothing behind. A lock file removed between another process's open and its flock would let
    two holders in, so the holder checks the path still names the file it locked."""

    def __init__(self, out_dir: Path):
        import fcntl

        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(self.path).st_ino != os.fstat(self.handle.fileno()).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            self.handle.close()
            raise JoraError("another jora process is writing this output right now; wait for it to end",
                            out_dir) from None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()


def _list_outputs(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".lock")}


def output_key(directory: Path) -> str | None:
    """What later stages hash instead of re-reading a finished output: its cache key plus the id of the
    build that wrote it, so a rebuilt output (deleted, or forced) re-runs everything after it too."""
    manifest = read_manifest(Path(directory))
    if not manifest:
        return None
    return f"{manifest.get('key')}.{manifest['build']}" if manifest.get("build") else manifest.get("key")


def upstream_key(path: Path, what: str) -> str:
    """An input directory's identity for a cache key: the stage key (and build) of a jora output, or for
    a directory jora did not make, a hash of its index file."""
    if not Path(path).is_dir():
        raise JoraError(f"{what} not found", path)
    key = output_key(path)
    if key:
        return key
    for index in ("store.json", "stats.json", "adapter.json"):
        if (Path(path) / index).is_file():
            return hashlib.sha256((Path(path) / index).read_bytes()).hexdigest()
    raise JoraError(f"not a jora {what}", path)


def adapter_input(adapter: str | Path) -> tuple[Path, str]:
    """A trained adapter given as a train output or its adapter/ directory: (the directory holding
    adapter.json, the hash of its weights and settings for a cache key)."""
    from jora_model.formats.adapter import adapter_dir

    directory = adapter_dir(Path(adapter))
    digest = hashlib.sha256((directory / "adapter.safetensors").read_bytes()
                            + (directory / "adapter.json").read_bytes()).hexdigest()
    return directory, digest


def run_stage(stage: str, code_version: str, out_dir: Path, inputs: dict[str, Path], settings: dict[str, Any],
              build: Callable[[Path], dict[str, Any] | None], force: bool = False,
              upstream: dict[str, str] | None = None, resumable: bool = False, team: Any = None) -> StageResult:
    """Run `build(tmp_dir)` unless `out_dir` already holds this exact result.

    `inputs` maps stable names to files whose contents decide the result; `upstream` maps names to
    the keys of earlier stages' outputs (their content hashes, without re-reading them); `settings`
    must be JSON-serialisable. `build` may return extra facts to record in the manifest.

    resumable: the work directory is named by the key (`.OUT.work-KEY`) and survives a failure or a
    kill, so the next run with the same inputs continues in it (training checkpoints live there).

    team: the processes of a multi-host run (jora_model.parallel.distributed.Team), all calling this with the
    same `out_dir` on a shared filesystem and all running `build` together. Process 0 alone clears
    stale work, writes the manifest and moves the result into place; the others wait for it and
    return what it wrote. Each process holds its own lock file, so two runs still exclude each other."""
    out_dir = Path(out_dir).absolute()
    leader = team is None or team.is_leader
    # Process 0 holds the output's lock from the skip check to the publish: two commands writing the same
    # output would otherwise both succeed, the second rename winning. No parent: nobody is writing there.
    guard = _writable(lambda: _OutputLock(out_dir), stage, out_dir) if leader and out_dir.parent.is_dir() else None
    try:
        if guard is not None:
            _restore_interrupted_swap(out_dir)
        plan = _plan(stage, code_version, out_dir, inputs, settings, force, upstream, team)
        if isinstance(plan, StageResult):
            return plan
        _writable(lambda: out_dir.parent.mkdir(parents=True, exist_ok=True), stage, out_dir)
        if leader:
            guard = guard or _writable(lambda: _OutputLock(out_dir), stage, out_dir)
            _sweep_partials(out_dir)
        return _build_and_publish(stage, code_version, out_dir, settings, build, force, resumable, team, plan)
    finally:
        if guard is not None:
            guard.release()


def _build_and_publish(stage: str, code_version: str, out_dir: Path, settings: dict[str, Any], build: Callable,
                       force: bool, resumable: bool, team: Any, plan: "_Plan") -> StageResult:
    leader = team is None or team.is_leader
    tmp, lock = _open_work_directory(stage, out_dir, plan.key, force, resumable, team)
    try:
        facts = build(tmp) or {}
        if lock is not None:
            Path(lock.name).unlink(missing_ok=True)  # the open handle keeps the lock until we are done
        if not leader:
            return _follow(stage, out_dir, plan.key, team)
        manifest = _publish(stage, code_version, out_dir, tmp, settings, plan, facts, team)
    except OSError as exc:
        _drop_unless_kept(tmp, leader, resumable)
        if exc.errno == errno.ENOSPC:
            raise JoraError(f"no space left on the device while writing {stage} output; "
                            "the previous output is untouched", out_dir) from None
        raise
    except BaseException:
        _drop_unless_kept(tmp, leader, resumable)
        raise
    finally:
        if lock is not None:
            lock.close()
    log.info("%s: wrote %s in %.1f s", stage, out_dir, manifest["seconds"])
    return StageResult(stage, out_dir, False, plan.key, manifest)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A stage that has to be built: its cache key and the input hashes behind it."""
    key: str
    hashed: dict[str, dict[str, Any]]
    started: float  # time.monotonic() when the work began, for the manifest's seconds


def _plan(stage: str, code_version: str, out_dir: Path, inputs: dict[str, Path], settings: dict[str, Any],
          force: bool, upstream: dict[str, str] | None, team: Any) -> _Plan | StageResult:
    """The cache key, and the finished result when `out_dir` already holds it."""
    previous = _check_ours(out_dir, stage)
    started = time.monotonic()
    hashed = hash_inputs(inputs, previous)
    for name, identity in (upstream or {}).items():
        hashed[name] = {"sha256": identity, "upstream": True}
    key = cache_key(stage, code_version, settings, hashed)
    up_to_date = bool(previous and not force and previous.get("key") == key and _outputs_intact(out_dir, previous))
    if team is not None and team.several:  # process 0's view decides, so no process trains alone
        up_to_date = bool(team.broadcast_int(int(up_to_date), "agreeing whether the output is up to date"))
        previous = read_manifest(out_dir) if up_to_date else previous
    if up_to_date:
        log.info("%s: skipped, %s is up to date (key %s)", stage, out_dir, key[:12])
        return StageResult(stage, out_dir, True, key, previous)
    if previous and previous.get("key") == key and not force:
        log.info("%s: output files in %s are missing or changed; rebuilding", stage, out_dir)
    return _Plan(key, hashed, started)


def _open_work_directory(stage: str, out_dir: Path, key: str, force: bool, resumable: bool, team: Any):
    """Where `build` writes, and the lock held on it (None for a private partial directory)."""
    leader = team is None or team.is_leader
    if not resumable:
        if team is not None and team.several:
            raise ValueError("a stage run by several processes must be resumable (a work directory by key)")
        tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp, None
    tmp = work_directory(out_dir, key)
    if leader:
        if force:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in out_dir.parent.glob(f".{out_dir.name}.work-*"):
            if stale != tmp:
                log.info("%s: removing %s (made with other inputs or settings)", stage, stale.name)
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(exist_ok=True)
    if team is not None:
        team.barrier(f"jora {stage}: work directory ready")
    return tmp, _lock(tmp, team)


def _follow(stage: str, out_dir: Path, key: str, team: Any) -> StageResult:
    """A process other than 0: wait while process 0 writes the manifest and moves the output in."""
    team.barrier(f"jora {stage}: built")
    team.barrier(f"jora {stage}: in place")
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("key") != key:
        raise JoraError("process 0 did not leave the finished output here (is the directory on a "
                        "filesystem every process shares?)", out_dir)
    return StageResult(stage, out_dir, False, key, manifest)


def _publish(stage: str, code_version: str, out_dir: Path, tmp: Path, settings: dict[str, Any], plan: _Plan,
             facts: dict[str, Any], team: Any) -> dict[str, Any]:
    """Write the manifest last and move the finished directory into place; returns the manifest."""
    if team is not None:
        team.barrier(f"jora {stage}: built")
    manifest = {
        "stage": stage, "key": plan.key, "build": uuid.uuid4().hex, "code_version": code_version,
        "settings": settings,
        "inputs": plan.hashed, "outputs": _list_outputs(tmp), "facts": facts,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - plan.started, 3),
    }
    _write_json_durably(tmp / MANIFEST, manifest)
    _move_into_place(tmp, out_dir)
    if team is not None:
        team.barrier(f"jora {stage}: in place")
    return manifest


def _drop_unless_kept(tmp: Path, leader: bool, resumable: bool) -> None:
    """After a failure: a resumable stage keeps its work (checkpoints) for the next run, unless it
    wrote nothing; a partial directory always goes."""
    if leader and (not resumable or not any(not p.name.startswith(".lock") for p in tmp.iterdir())):
        shutil.rmtree(tmp, ignore_errors=True)


def work_directory(out_dir: Path, key: str) -> Path:
    return Path(out_dir).absolute().parent / f".{Path(out_dir).name}.work-{key[:16]}"


def _lock(directory: Path, team: Any = None):
    """An exclusive lock on a work directory: two runs must not write the same checkpoints. In a
    multi-host run each process locks its own file (`.lock`, `.lock.1`, ...), so the processes of one
    run do not refuse each other while a second run is still refused."""
    import fcntl

    name = ".lock" if team is None or team.process_id == 0 else f".lock.{team.process_id}"
    handle = open(directory / name, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise JoraError("another jora process is working on this output right now", directory) from None
    return handle


def _write_json_durably(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap the finished directory in. Between the two renames the old output sits under a hidden
    name, so no reader ever sees a mix of old and new files."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
