"""Scheduled deployments of the `finetune` flow, and Prefect servers that end with the jora process.

`jora deploy` serves the flow (flow.serve): a long-running process that registers the deployment with
its cron schedule and runs each triggered flow run in a subprocess. `prefect deployment run
'finetune/NAME' --param ...` triggers it. Telemetry is off so nothing leaves the machine.

A Prefect server is a child process: `jora server` starts `prefect server start`, and a flow run with no
PREFECT_API_URL starts Prefect's temporary server (about 200 MB, a port held). Both are started here so
that they die with their parent (stages/children.py: die_with_parent), even when it is killed outright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "jora"}


def serve(name: str, cron: str | None, settings) -> None:
    from pipeline.flow import finetune

    start_temporary_server()
    finetune.serve(name=name, cron=cron, parameters={"settings": settings.model_dump()},
                   description="LoRA fine-tune: convert, tokenize, train, merge, export (cached stages)")


def start_server(host: str = "127.0.0.1", port: int = 4200, ui: bool = True) -> int:
    """Run `prefect server start` in the foreground on `host` (loopback unless the user says otherwise);
    its exit status. Stopped or interrupted, the server is stopped before this returns (SIGTERM: it
    closes its database), and the exception goes on to the command line."""
    from stages.children import child_dies_with_us

    env = {**os.environ, **OFFLINE}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
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
