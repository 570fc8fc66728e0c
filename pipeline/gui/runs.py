"""A launched finetune: the flow in a child process (`jora run --config`), or a run of a Prefect
deployment when a server is configured. Both collect log lines in a background thread, so launching
returns at once and the page only ever reads a snapshot.

Why a child process rather than a thread of the page's own process: JAX would hold the GIL through
compilation and make the page stall, the accelerator's memory belongs to the run alone, and Stop is a
SIGTERM, which the trainer turns into a checkpoint the next launch resumes from.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from jora_model.errors import JoraError
from pipeline.gui.progress import stage_event
from pipeline.settings import FinetuneSettings
from stages.children import popen_tied

LOG_LINES = 400  # lines of log kept for the page; the full log is the run's own business
OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "jora",
           "PYTHONUNBUFFERED": "1"}


@dataclasses.dataclass(frozen=True)
class RunView:
    status: str  # running, succeeded, failed or stopped
    finished: dict[str, str]  # stage -> "ran" | "skipped", for the stages that said so
    log: tuple[str, ...]  # the newest log lines
    error: str | None  # one line: why it failed
    where: str  # what runs it: a child process or a Prefect flow run
    seconds: float  # since launch


class Run:
    """What both kinds of run share: the log and the stages it reports finished."""

    def __init__(self, settings: FinetuneSettings, where: str):
        self.settings = settings
        self.work = Path(settings.workdir)
        self.where = where
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._finished: dict[str, str] = {}
        self._status = "running"
        self._error: str | None = None
        self._stop_requested = False

    def _feed(self, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        event = stage_event(line)
        with self._lock:
            self._log.append(line)
            if event:
                self._finished[event[0]] = event[1]
            if line.startswith("error: "):
                self._error = line[len("error: "):]

    def _end(self, status: str, error: str | None = None) -> None:
        with self._lock:
            if status == "failed" and self._stop_requested:
                status = "stopped"
            self._status = status
            if error and not self._error:
                self._error = error

    def view(self) -> RunView:
        with self._lock:
            return RunView(self._status, dict(self._finished), tuple(self._log), self._error, self.where,
                           time.monotonic() - self.started)

    @property
    def active(self) -> bool:
        with self._lock:
            return self._status == "running"

    def stop(self) -> None:
        raise NotImplementedError


_GUI_MARK = "# written by `jora gui`"


def _written_by_gui(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(_GUI_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def write_config(settings: FinetuneSettings) -> Path:
    """The settings as YAML in the work directory: what the child runs, and what a user can run again
    from a terminal with `jora run --config`."""
    work = Path(settings.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "gui-settings.yaml"
    if path.exists() and not _written_by_gui(path):  # a user's own file of that name is never replaced
        raise JoraError("a gui-settings.yaml that jora gui did not write is here; move it or pick another "
                        "work directory", path)
    path.write_text(_GUI_MARK + "; run the same again with: jora run --config " + str(path) + "\n"
                    + yaml.safe_dump(settings.model_dump(), sort_keys=False), encoding="utf-8")
    return path


class LocalRun(Run):
    """`jora run --config` in a child process."""

    def __init__(self, settings: FinetuneSettings):
        config = write_config(settings)
        command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)]
        env = {**os.environ, **OFFLINE}
        # Without a server, Prefect starts a temporary one per run and gives it 20 s to come up: too short
        # on a machine busy with other work (seen on a loaded 2-core box); a user's own value wins.
        env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        # tied to this process: a GUI killed outright (kill -9, the out-of-memory killer) stops its run
        # with SIGTERM, which the run ends as a Stop (a checkpoint the next launch resumes from)
        self.process = popen_tied(command, signal.SIGTERM, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1, env=env, errors="replace")
        super().__init__(settings, f"child process {self.process.pid}: jora run --config {config}")
        threading.Thread(target=self._follow, name="jora-gui-run", daemon=True).start()

    def _follow(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                self._feed(line)
        except Exception as exc:  # never leave the page showing a run that is not followed any more
            self._feed(f"jora gui: stopped reading the run's output ({type(exc).__name__}: {exc})")
        code = self.process.wait()
        if code == 0:
            self._end("succeeded")
        else:
            last = next((line for line in reversed(self.view().log)), f"exit status {code}")
            self._end("failed", last)

    def stop(self) -> None:
        """SIGTERM: training stops after the step in flight and keeps a checkpoint."""
        with self._lock:
            self._stop_requested = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


def prefect_server() -> str | None:
    """The configured Prefect API (PREFECT_API_URL), if any: then Launch can go through a deployment."""
    return os.environ.get("PREFECT_API_URL") or None


def check_deployment(name: str) -> str | None:
    """Why `name` (FLOW/DEPLOYMENT) cannot be run, or None."""
    if not prefect_server():
        return "no Prefect server is configured (set PREFECT_API_URL); leave this empty to run here"
    if "/" not in name:
        return "give it as FLOW/DEPLOYMENT, e.g. finetune/nightly"
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        return f"no deployment {name!r} on {prefect_server()} (start one with jora deploy --name ...)"
    except Exception as exc:  # the server is down or refuses: say so next to the field
        return f"cannot reach the Prefect server at {prefect_server()}: {type(exc).__name__}"
    return None


class DeploymentRun(Run):
    """A flow run of a served deployment (`jora deploy`), with these settings as its parameters. Its
    logs come from the Prefect API; its outputs land in the work directory, which the deployment's
    process must share with this page (a server on this machine, as `jora server` starts)."""

    POLL_SECONDS = 2.0

    def __init__(self, settings: FinetuneSettings, deployment: str):
        from prefect.deployments import run_deployment

        try:
            flow_run = run_deployment(name=deployment, parameters={"settings": settings.model_dump()}, timeout=0)
        except Exception as exc:
            raise JoraError(f"could not start deployment {deployment!r}: {exc}") from None
        self.flow_run_id = flow_run.id
        super().__init__(settings, f"Prefect deployment {deployment}, flow run {flow_run.name}")
        # The follower talks to the same server as this call: Prefect keeps its settings in context
        # variables, which a new thread does not inherit unless given them.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._follow_safely,), name="jora-gui-deployment",
                         daemon=True).start()

    def _follow_safely(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # the server went away: say so rather than look busy forever
            self._end("failed", f"lost track of the flow run on {prefect_server()}: {type(exc).__name__}: {exc}")

    def _follow(self) -> None:
        from prefect import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        seen: set = set()
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]))

        def read_new_logs(client) -> int:
            """Feed the logs not seen yet. All are read each time and told apart by id: a batch that arrives
            late can sort before logs already read, and reading on from an offset would skip it."""
            logs, offset = [], 0
            while True:
                page = client.read_logs(log_filter=log_filter, offset=offset, limit=200, sort=LogSort.TIMESTAMP_ASC)
                logs += page
                offset += len(page)
                if len(page) < 200:
                    break
            new = [record for record in logs if record.id not in seen]
            for record in new:
                seen.add(record.id)
                self._feed(f"{record.timestamp:%H:%M:%S} {record.message}")
            return len(new)

        with get_client(sync_client=True) as client:
            while True:
                flow_run = client.read_flow_run(self.flow_run_id)
                read_new_logs(client)
                state = flow_run.state
                if state is not None and state.is_final():
                    # The served process sends its logs in batches, the last ones after the final state:
                    # read until two polls in a row bring nothing new (at most about 20 s).
                    quiet = 0
                    for _ in range(10):
                        time.sleep(self.POLL_SECONDS)
                        quiet = 0 if read_new_logs(client) else quiet + 1
                        if quiet == 2:
                            break
                    if state.is_completed():
                        self._end("succeeded")
                    elif state.is_cancelled():
                        self._end("stopped")
                    else:
                        self._end("failed", state.message or state.name)
                    return
                time.sleep(self.POLL_SECONDS)

    def stop(self) -> None:
        from prefect import get_client
        from prefect.states import Cancelling

        with self._lock:
            self._stop_requested = True
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(self.flow_run_id, Cancelling(), force=True)
