"""The host names jora's servers answer (the GUI, and the Prefect server `jora server` starts): a page on
another site that reaches a local server through DNS rebinding sends its own name in the Host header and
is refused. Bound beyond loopback, the machine's own names (and the ones a user adds) are accepted too.
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
