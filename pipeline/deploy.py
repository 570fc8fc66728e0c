"""Scheduled deployments of the `finetune` flow, and Prefect servers that end with the jora process.

`jora deploy` serves the flow (flow.serve): a long-running process that registers the deployment with
its cron schedule and runs each triggered flow run in a subprocess. `prefect deployment run
'finetune/NAME' --param ...` triggers it. Telemetry is off so nothing leaves the machine.

A Prefect server is a child process: `jora server` starts Prefect's server (pipeline/prefect_server.py: as
`prefect server start` runs it, behind a Host-name allow-list), and a flow run with no
PREFECT_API_URL starts Prefect's temporary server (about 200 MB, a port held). Both are started here so
that they die with their parent (stages/children.py: die_with_parent), even when it is killed outright.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from pipeline.hosts import WILDCARD

OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "jora"}


# Set by `jora deploy` to its own pid: the flow runs it starts (Prefect's runner spawns each in a child
# process, with no way to pass a preexec_fn) tie themselves to it (`tie_to_runner`).
RUNNER_PID = "JORA_DEPLOY_RUNNER_PID"


def serve(name: str, cron: str | None, settings) -> None:
    from pipeline.flow import finetune

    os.environ[RUNNER_PID] = str(os.getpid())
    start_temporary_server()
    finetune.serve(name=name, cron=cron, parameters={"settings": settings.model_dump()},
                   description="LoRA fine-tune: convert, tokenize, train, merge, export (cached stages)")




def server_environment(host: str, port: int, environ=None) -> dict[str, str]:
    """The environment of Prefect's server on HOST:PORT (pipeline/prefect_server.py). The UI reads its API
    address from PREFECT_SERVER_API_PORT (4200) or a client's PREFECT_API_URL and, on any other port, showed
    only "Something went wrong" (issue 22): the server's own address is set here, unless the user named the
    UI's API address (e.g. a reverse proxy). CORS is limited to the UI's own origins, so other web sites a
    browser visits may not call this API; the Host allow-list refuses DNS rebinding."""
    environ = os.environ if environ is None else environ
    env = {**environ, **OFFLINE, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    address = f"[{host}]" if ":" in host else host
    names = [address, "127.0.0.1", "localhost", "[::1]"]
    if host in WILDCARD:  # reached by this machine's own names; the page's address cannot be known here
        names[:1] = [socket.gethostname(), socket.getfqdn()]
    own = dict.fromkeys(f"http://{name}:{port}" for name in names)  # ordered, without repeats
    # A wildcard address is no address a browser on another machine can use (and recent Chromium refuses
    # 0.0.0.0): the page's own origin then, which a relative URL gives (both Prefect UIs accept it).
    ours = {("PREFECT_SERVER_UI_API_URL", "PREFECT_UI_API_URL"):
            "/api" if host in WILDCARD else f"http://{address}:{port}/api",
            ("PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS", "PREFECT_SERVER_CORS_ALLOWED_ORIGINS"): ",".join(own)}
    for spellings, value in ours.items():  # Prefect reads either spelling; the user's setting wins
        if not any(environ.get(name) for name in spellings):
            env[spellings[0]] = value
    return env


def tie_to_runner() -> None:
    """In a flow run that `jora deploy`'s runner started: SIGTERM this process when the runner dies
    (kill -9 and the out-of-memory killer included), so a run never goes on holding the accelerator for
    nobody. Only a direct child ties itself: another process in between would be the one the kernel
    watches."""
    from stages.children import die_with_parent

    runner = os.environ.get(RUNNER_PID, "")
    if runner.isdigit() and int(runner) != os.getpid() and os.getppid() == int(runner):
        die_with_parent(int(runner), signal.SIGTERM)


def start_server(host: str = "127.0.0.1", port: int = 4200, ui: bool = True) -> int:
    """Run Prefect's server in the foreground on `host` (loopback unless the user says otherwise);
    its exit status. Stopped or interrupted, the server is stopped before this returns (SIGTERM: it
    closes its database), and the exception goes on to the command line."""
    from stages.children import child_dies_with_us

    env = server_environment(host, port)
    # Prefect's server as `prefect server start` runs it, behind a Host allow-list (pipeline/prefect_server.py)
    command = [sys.executable, "-m", "pipeline.prefect_server", "--host", host, "--port", str(port)]
    if not ui:
        command.append("--no-ui")
    server = subprocess.Popen(command, env=env, preexec_fn=child_dies_with_us(signal.SIGTERM))
    try:
        return server.wait()
    except BaseException:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        raise


def start_temporary_server() -> None:
    """Start the temporary server Prefect would start on a flow's first API call, now, from this (the
    main) thread, tied to this process; a no-op when PREFECT_API_URL names a server. Prefect starts it
    from whichever thread first needs it, with no way to pass a preexec_fn, so the one instance it keeps
    per process gets a launcher that adds one; the death signal follows the starting thread, hence the
    main thread. It is stopped at exit by Prefect's own atexit hook, as before."""
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL

    from stages.children import child_dies_with_us

    if PREFECT_API_URL.value():  # the same test as Prefect's get_client()
        return
    instance = prefect_server.SubprocessASGIServer()  # the one get_client() will find (port None)
    if instance.running:
        return
    launch = getattr(instance, "_run_uvicorn_command", None)
    if launch is None:  # a Prefect that launches it otherwise: start it untied (tests/test_run_failures.py says)
        instance.start()
        return

    def launch_tied():
        # Prefect's launcher calls subprocess.Popen itself: swapped for the length of that call only, in
        # the main thread, before the flow has started any thread that could start a process meanwhile.
        popen = subprocess.Popen
        subprocess.Popen = lambda *args, **kwargs: popen(*args, preexec_fn=child_dies_with_us(signal.SIGTERM),
                                                          **kwargs)
        try:
            return launch()
        finally:
            subprocess.Popen = popen

    instance._run_uvicorn_command = launch_tied
    instance.start()
