"""Scheduled deployments of the `finetune` flow, and a local Prefect server for users without one.

`jora deploy` serves the flow (flow.serve): a long-running process that registers the deployment with
its cron schedule and runs each triggered flow run in a subprocess. `prefect deployment run
'finetune/NAME' --param ...` triggers it. Telemetry is off so nothing leaves the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "jora"}


def serve(name: str, cron: str | None, settings) -> None:
    from pipeline.flow import finetune

    finetune.serve(name=name, cron=cron, parameters={"settings": settings.model_dump()},
                   description="LoRA fine-tune: convert, tokenize, train, merge, export (cached stages)")


def start_server(host: str = "127.0.0.1", port: int = 4200, ui: bool = True) -> int:
    """Run `prefect server start` in the foreground on `host` (loopback unless the user says otherwise)."""
    env = {**os.environ, **OFFLINE}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    if not ui:
        command.append("--no-ui")
    return subprocess.call(command, env=env)
