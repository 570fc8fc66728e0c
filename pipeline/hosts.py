"""Where jora's servers listen (the GUI, and the Prefect server `jora server` starts): the host names they
answer, and whether their port is free. A page on another site that reaches a local server through DNS
rebinding sends its own name in the Host header and is refused; bound beyond loopback, the machine's own
names (and the ones a user adds) are accepted too.
"""

from __future__ import annotations

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The Host header names (without port) a server bound to `host` answers."""
    import socket

    names = [*LOOPBACK, "[::1]", *extra]
    if host not in LOOPBACK:
        names += [socket.gethostname(), socket.getfqdn()] + ([host] if host not in WILDCARD else [])
    return list(dict.fromkeys(names))


def port_free(host: str, port: int) -> None:
    """Refuse in one line a port something already listens on (the servers would fail with a traceback
    after their start-up). Bound and closed at once: only another program's socket refuses it."""
    import errno
    import socket

    from jora_model.errors import JoraError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise JoraError(f"port {port} on {host} is in use (another server?); choose one with --port") \
                    from None
            raise JoraError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
