"""`edge-server`: serve the tail of a prepared model over gRPC, with an ops HTTP port."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from coinfer.settings_cli import add_settings_flags, settings_from_args, setup_logging
from edge_server.config import EdgeSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-server",
        description="coinfer edge server: runs layers [k, N) + lm_head of a split model for devices over gRPC "
                    "(coinfer.v1.EdgeInference, grpc.health.v1, reflection) and serves /healthz /readyz /metrics "
                    "/v1/info on the ops port. Every flag can also be set as a COINFER_ environment variable.",
    )
    add_settings_flags(p, EdgeSettings)
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(EdgeSettings, args, parser)
    setup_logging(args.log_level)
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
