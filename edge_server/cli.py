"""`edge-server`: serve the tail of a prepared model over gRPC, with an ops HTTP port."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from coinfer.settings_cli import app_parser, parse_app_args
from edge_server.config import EdgeSettings


def build_parser() -> argparse.ArgumentParser:
    return app_parser(
        "edge-server",
        "coinfer edge server: runs layers [k, N) + lm_head of a split model for devices over gRPC "
        "(coinfer.v1.EdgeInference, grpc.health.v1, reflection) and serves /healthz /readyz /metrics "
        "/v1/info on the ops port.",
        EdgeSettings,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_app_args(build_parser(), EdgeSettings, argv)
    from edge_server.server import EdgeServer  # heavy imports after --help

    try:
        server = EdgeServer(settings)
        server.start()
    except (OSError, ValueError) as e:
        print(f"edge-server: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # machine-readable line for launchers and tests that start us on port 0
    host = settings.host
    print(f"READY pid={os.getpid()} grpc={host}:{server.grpc_port} ops=http://{host}:{server.ops_port}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
