"""An app process's life: start its server, announce it, serve until SIGTERM or SIGINT, stop.

Why shared: both apps must behave alike for whoever runs them (the launcher, the tests, docker,
Kubernetes): one `READY pid=... key=value ...` line on stdout once they listen (on port 0 it is
how a caller learns the port), a graceful stop on either signal, exit status 0 after it and 1
when the server cannot start. The servers run in their own threads, so the main thread keeps
the signals. Before loading any model, each app checks its ports (`ports_in_use`): loading takes
seconds to minutes, and a port in use should cost neither.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable


def run_until_signalled(
    server_start: Callable[[], str], server_stop: Callable[[], None], prog: str, alive: Callable[[], bool] | None = None
) -> int:
    """server_start() starts the server and returns the READY line's fields ("grpc=host:port ...");
    OSError or ValueError from it is reported as `prog: error`, exit 1. Then serve until a signal,
    or until alive() turns False (a server thread that died), and server_stop(); exit 0."""
    try:
        fields = server_start()
    except (OSError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"READY pid={os.getpid()} {fields}", flush=True)  # machine-readable, for launchers and tests
    if alive is None:
        stop.wait()
    else:
        while not stop.wait(0.5) and alive():
            pass
    server_stop()
    return 0


def port_in_use(host: str, port: int) -> bool:
    """Whether a socket cannot bind `host`:`port` now because it is in use (False for port 0, and for
    a host this check cannot resolve or bind for another reason: the server's own bind reports that).

    A bind test, then close: with SO_REUSEADDR as uvicorn and gRPC bind (so a port left in TIME_WAIT
    passes, as it would for them) and without SO_REUSEPORT, which would let us share a live port."""
    if port == 0:
        return False
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def ports_in_use(host: str, ports: dict[str, int]) -> str | None:
    """One line on the first problem of `ports` (what each is -> its number) on `host`: one in use
    ("REST port 8000 on 127.0.0.1 is already in use"), or one number given for two ports."""
    taken: dict[int, str] = {}
    for name, port in ports.items():
        if port and port in taken:
            return f"{taken[port]} and {name} are both {port}"
        taken[port] = name
        if port_in_use(host, port):
            return f"{name} {port} on {host} is already in use"
    return None
