"""`edge-server`: serve the tail of a prepared model over gRPC, with an ops HTTP port."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

from coinfer.lifecycle import ports_in_use, run_until_signalled
from coinfer.settings_cli import app_parser, parse_app_args
from edge_server.config import EdgeSettings

M_ARENA_MAX = -8  # glibc <malloc.h>


def build_parser() -> argparse.ArgumentParser:
    return app_parser(
        "edge-server",
        "coinfer edge server: runs layers [k, N) + lm_head of a split model for devices over gRPC "
        "(coinfer.v1.EdgeInference, grpc.health.v1, reflection) and serves /healthz /readyz /metrics "
        "/v1/info on the ops port.",
        EdgeSettings,
    )


def limit_malloc_arenas() -> int | None:
    """On glibc, cap malloc arenas at COINFER_MALLOC_ARENAS (default 2; 0 = leave glibc's default).
    Returns the cap set, or None where none was (not glibc, no mallopt, 0, or not a number).

    Why: glibc gives each thread that contends for the heap its own arena (up to 8 per core), and an
    arena keeps memory it has freed. Every gRPC handler thread (`workers`) would get one, and each
    would keep the peak of the large messages it handled (maximal Opens of up to max_message_bytes),
    so the edge's RSS ratchets up under a flood of them. Must run before the server's threads start."""
    raw = os.environ.get("COINFER_MALLOC_ARENAS", "2").strip()
    try:
        n = int(raw)
        os.confstr("CS_GNU_LIBC_VERSION")  # glibc only: ValueError / OSError / AttributeError elsewhere
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError, TypeError):
        return None
    if n <= 0:
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return n if mallopt(M_ARENA_MAX, n) == 1 else None


def main(argv: list[str] | None = None) -> int:
    settings = parse_app_args(build_parser(), EdgeSettings, argv)
    server_settings = settings.server
    # before the model loads (seconds to minutes): a taken port fails at once, in one line
    problem = ports_in_use(
        server_settings.host, {"gRPC port": server_settings.grpc_port, "ops port": server_settings.ops_port}
    )
    if problem:
        print(f"edge-server: {problem}", file=sys.stderr)
        return 1
    limit_malloc_arenas()  # before the heavy imports and the server's threads
    from edge_server.server import EdgeServer  # heavy imports after --help

    server: EdgeServer | None = None

    def start() -> str:
        nonlocal server
        server = EdgeServer(settings)
        server.start()
        host = settings.server.host
        return f"grpc={host}:{server.grpc_port} ops=http://{host}:{server.ops_port}"

    def stop() -> None:
        assert server is not None  # only a server that started is stopped
        server.stop()

    return run_until_signalled(start, stop, "edge-server")


if __name__ == "__main__":
    sys.exit(main())
