"""Several processes, one run: JAX's distributed runtime, started before anything touches a device.

Each process (one per host on a GPU cluster) runs the same `jora train` command. Process 0 hosts the
coordination service at --coordinator HOST:PORT; every process connects to it, and from then on
`jax.devices()` lists the devices of all processes and one mesh spans them. Collectives between
processes go over NCCL on GPUs (JAX's default) and over gloo on CPUs.

When a process dies, the others must not hang:
  * a process waiting in a collective gets an error at once (gloo/NCCL see the connection close);
    `peer_failure` turns it into one JoraError line, and the exit skips JAX's shutdown barrier
    (which would otherwise wait for the dead peer and then abort with a stack trace);
  * a process that is not in a collective is stopped by JAX's coordination service when the dead
    peer misses heartbeats for `heartbeat_timeout_s` (JAX then aborts the process with its own message).
So a survivor exits within heartbeat_timeout_s plus one step, and usually within one step.

Importing this module does no work; everything JAX is imported inside the functions.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import sys
from typing import Any

from jora_model.errors import JoraError

log = logging.getLogger("jora")

# What JAX's own cluster detection reads (jax/_src/clusters): only these make us try it.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OMPI_URI = "OMPI_MCA_orte_hnp_uri"
HARD_EXIT_STATUS = 2  # the CLI's status for a JoraError


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    coordinator: str | None = None  # "HOST:PORT" where process 0 serves the coordination service
    num_processes: int | None = None  # processes in the run (all run the same command)
    process_id: int | None = None  # this process: 0 .. num_processes - 1; 0 writes the outputs
    heartbeat_timeout_s: int = 100  # a peer silent this long is declared dead and every process stops
    init_timeout_s: int = 300  # how long process 0 waits for the others to connect (and they for it)

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.coordinator, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise JoraError("multi-host training needs all of --coordinator HOST:PORT, --num-processes N "
                            "and --process-id I")
        if self.coordinator is not None and not re.fullmatch(r"\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}", self.coordinator):
            raise JoraError(f"--coordinator wants HOST:PORT, got {self.coordinator!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise JoraError(f"--num-processes must be at least 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
            raise JoraError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")
        for name in ("heartbeat_timeout_s", "init_timeout_s"):
            if getattr(self, name) < 1:
                raise JoraError(f"{name} must be at least 1 second, got {getattr(self, name)}")

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None


def cluster_detected(environ: dict[str, str] | None = None) -> str | None:
    """The cluster manager whose variables say this process is one of several ("slurm", "ompi"),
    or None. One task alone (an `salloc` shell, `srun -n 1`) is not worth a coordination service."""
    env = os.environ if environ is None else environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if all(v in env for v in SLURM_VARS) and count("SLURM_NTASKS") > 1:
        return "slurm"
    if OMPI_URI in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    return None


@dataclasses.dataclass(frozen=True)
class Team:
    """The processes of one run as the stages see them: who writes, and a way to wait for each other."""
    process_id: int = 0
    num_processes: int = 1

    @property
    def is_leader(self) -> bool:
        """Process 0 writes the manifest, the outputs, the metrics and the checkpoints."""
        return self.process_id == 0

    @property
    def several(self) -> bool:
        return self.num_processes > 1

    def barrier(self, name: str) -> None:
        """Return once every process has got here (a no-op for one process)."""
        if self.several:
            from jax.experimental import multihost_utils

            with collective(f"waiting for the others at {name!r}"):
                multihost_utils.sync_global_devices(name)

    def broadcast_int(self, value: int, doing: str = "agreeing on a value") -> int:
        """Process 0's `value`, on every process."""
        if not self.several:
            return int(value)
        import numpy as np
        from jax.experimental import multihost_utils

        with collective(doing):
            return int(multihost_utils.broadcast_one_to_all(np.int64(value)))

    def any(self, flag: bool, doing: str = "agreeing on a value") -> bool:
        """Whether any process says yes (every process must ask)."""
        if not self.several:
            return bool(flag)
        import numpy as np
        from jax.experimental import multihost_utils

        with collective(doing):
            return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


# This process's run: its team, whether it is leaving after a failure, and what to tell the user
# about resuming (the trainer keeps it current: which checkpoint is kept).
_state: dict[str, Any] = {"team": None, "failed": False, "resume_hint": ""}


def initialize(settings: DistributedSettings = DistributedSettings()) -> Team:
    """Start JAX's distributed runtime when this run has several processes; returns the team.

    With --coordinator etc. that run is described exactly; without, JAX's cluster detection is tried
    only when SLURM or Open MPI variables say there are several tasks; otherwise the run is this one
    process and nothing is started. Must run before anything queries a device."""
    if _state["team"] is not None:  # already started in this process (the flow, then its train task)
        return _state["team"]
    detected = None if settings.explicit else cluster_detected()
    if (not settings.explicit and detected is None) or settings.num_processes == 1:
        return Team()

    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise JoraError("multi-host training must start before JAX touches a device, but this process has "
                        "already used JAX; run `jora train` in a fresh process")
    # CPU processes exchange collectives over gloo (TCP); GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": settings.init_timeout_s,
                              "heartbeat_timeout_seconds": settings.heartbeat_timeout_s,
                              "shutdown_timeout_seconds": settings.heartbeat_timeout_s}
    if settings.explicit:
        # All given: JAX's cluster detection would still pin one GPU per SLURM task; one process
        # per host must see all of its devices.
        kwargs.update(coordinator_address=settings.coordinator, num_processes=settings.num_processes,
                      process_id=settings.process_id, cluster_detection_method="deactivate")
    where = settings.coordinator or f"the coordinator {detected} names"
    if settings.explicit and settings.process_id != 0:
        # JAX aborts the process (a C++ fatal error) when it cannot reach the coordinator in time;
        # waiting for the port first turns the usual cause into one line.
        _wait_for_port(settings.coordinator, settings.init_timeout_s)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as exc:  # JAX raises RuntimeError/ValueError/JaxRuntimeError here
        raise JoraError(f"could not join the multi-host run at {where}: {_first_line(exc)} "
                        f"(waited up to {settings.init_timeout_s} s for every process)") from None
    # Registered after JAX's own exit hooks, so it runs first: after a peer failure, leave at once
    # instead of waiting at JAX's shutdown barrier for a process that is gone.
    atexit.register(_exit_now_if_failed)
    team = Team(jax.process_index(), jax.process_count())
    log.info("train: process %d of %d joined the run at %s (%d devices here, %d in all)", team.process_id,
             team.num_processes, where, jax.local_device_count(), jax.device_count())
    _state["team"] = team
    return team


def _wait_for_port(address: str, timeout_s: float) -> None:
    import socket
    import time

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise JoraError(f"no coordinator answered at {address} within {timeout_s} s ({exc.strerror or exc}); "
                                "start process 0 there (same --coordinator) or check the address") from None
            time.sleep(0.5)


def current_team() -> Team:
    """The team `initialize` formed (one process when it was not called)."""
    return _state["team"] or Team()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def set_resume_hint(text: str) -> None:
    """What a peer-failure message says about resuming (e.g. which checkpoint is kept)."""
    _state["resume_hint"] = text


class collective:
    """Around code that talks to the other processes: a runtime error there means a peer is gone
    (or unreachable). It becomes one JoraError line, and the process will exit without JAX's
    shutdown barrier. Single-process runs pass errors through untouched."""

    def __init__(self, doing: str):
        self.doing = doing

    def __enter__(self) -> "collective":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not current_team().several:
            return False
        failure = peer_failure(exc, self.doing)
        if failure is None:
            return False
        raise failure from None


def peer_failure(exc: BaseException, doing: str) -> JoraError | None:
    """A JoraError for a runtime error seen in a multi-process run (None for anything else)."""
    import jax

    if isinstance(exc, JoraError) or not isinstance(exc, jax.errors.JaxRuntimeError):
        return None
    _state["failed"] = True
    team = current_team()
    return JoraError(f"process {team.process_id} of {team.num_processes} lost contact with the others while "
                     f"{doing} ({_first_line(exc)}); another process probably died. Restart every process "
                     f"with the same command to resume{_state['resume_hint']}.")


def mark_failed() -> None:
    """This process leaves on an error: skip JAX's shutdown barrier (the peers stop when we do)."""
    if current_team().several:
        _state["failed"] = True


def _exit_now_if_failed() -> None:
    if _state["failed"]:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream: nothing left to say
                pass
        os._exit(HARD_EXIT_STATUS)


def local_rows(sharding: Any, global_shape: tuple[int, ...], axis: int = 0) -> slice:
    """The contiguous range along `axis` that this process's devices hold under `sharding`: the rows
    of a global batch this process reads and feeds (all of them on one process)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        lo, hi, _ = index[axis].indices(global_shape[axis])
        starts.append(lo)
        stops.append(hi)
    lo, hi = min(starts), max(stops)
    covered = sorted(set(zip(starts, stops)))
    reach = lo
    for a, b in covered:
        if a > reach:
            raise JoraError(f"this process's devices hold rows {covered} of the batch, not one range; "
                            "order the mesh so that each process's devices are neighbours")
        reach = max(reach, b)
    return slice(lo, hi)


def place(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same on every process) -> global arrays placed by `shardings`; each device
    gets only its slice, which also works where a sharding spans devices of other processes."""
    import jax
    import numpy as np

    def one(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(one, tree, shardings)


def fetch(tree: Any) -> Any:
    """Global arrays -> full numpy arrays on every process (for saving). On one process this is
    `jax.device_get`; across processes, shards held elsewhere are gathered first."""
    import jax

    if not current_team().several:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    with collective("gathering the training state"):
        return multihost_utils.process_allgather(tree, tiled=True)


def global_batch(local: Any, sharding: Any, global_shape: tuple[int, ...]) -> Any:
    """A global array from this process's rows (`local_rows`) of it."""
    import jax

    if not current_team().several:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, global_shape)
