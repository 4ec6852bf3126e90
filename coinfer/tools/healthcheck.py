"""Container health probes without extra binaries: `python -m coinfer.tools.healthcheck grpc HOST:PORT`
(grpc.health.v1 Check) or `python -m coinfer.tools.healthcheck http URL` (2xx). Exit 0 = healthy."""

from __future__ import annotations

import argparse
import sys
import urllib.request


def check_grpc(address: str, service: str, timeout: float, ca: str = "", cert: str = "", key: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
    channel = (
        grpc.secure_channel(address, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))
        if ca
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name} {e.details()}", file=sys.stderr)
            return False
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def check_http(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            print(r.status)
            return 200 <= r.status < 300
    except OSError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coinfer.tools.healthcheck", description=__doc__)
    p.add_argument("kind", choices=["grpc", "http"])
    p.add_argument("target", help="HOST:PORT for grpc, a URL for http")
    p.add_argument("--service", default="coinfer.v1.EdgeInference", help="grpc health service name")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--ca", default="", help="grpc over TLS: PEM CA of the server's certificate")
    p.add_argument("--cert", default="", help="grpc mutual TLS: PEM client certificate")
    p.add_argument("--key", default="", help="grpc mutual TLS: PEM client key")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    ok = (
        check_grpc(a.target, a.service, a.timeout, a.ca, a.cert, a.key)
        if a.kind == "grpc"
        else check_http(a.target, a.timeout)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
