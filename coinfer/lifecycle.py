"""An app process's life: start its server, announce it, serve until SIGTERM or SIGINT, stop.

Why shared: both apps must behave alike for whoever runs them (the launcher, the tests, docker,
Kubernetes): one `READY pid=... key=value ...` line on stdout once they listen (on port 0 it is
how a caller learns the port), a graceful stop on either signal, exit status 0 after it and 1
when the server cannot start. The servers run in their own threads, so the main thread keeps
the signals.
"""

from __future__ import annotations

import os
import signal
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
