"""`python -m pipeline.prefect_server --host H --port P [--no-ui]`: Prefect's server, as `prefect server
start` runs it in the foreground (its app, with its services, under uvicorn), behind a Host-name
allow-list. Prefect has none of its own, so a web page could reach a local server through DNS rebinding
and start flow runs (`jora deploy` serves one that trains on whatever data a run names).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--no-ui", action="store_true")
    parser.add_argument("--allow-host", action="append", default=[], help="another Host name to answer.")
    args = parser.parse_args(argv)

    import os

    if args.no_ui:  # read by create_app, as `prefect server start --no-ui` sets it
        os.environ["PREFECT_SERVER_UI_ENABLED"] = "false"
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (PREFECT_SERVER_API_KEEPALIVE_TIMEOUT, PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
                                  PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT, PREFECT_SERVER_LOGGING_LEVEL)
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from pipeline.hosts import allowed_hosts

    app = TrustedHostMiddleware(create_app(final=True), allowed_hosts=allowed_hosts(args.host, tuple(args.allow_host)))
    uvicorn.run(app, host=args.host, port=args.port, timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
                ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
                ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
                log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower())


if __name__ == "__main__":
    main()
