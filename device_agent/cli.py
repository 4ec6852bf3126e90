"""`device-agent`: the OpenAI-compatible REST API on the device, running the head of a split model."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from coinfer.config_values import split_list
from coinfer.lifecycle import run_until_signalled
from coinfer.settings_cli import app_parser, parse_app_args
from device_agent.config import AgentSettings

log = logging.getLogger("coinfer.device")


def build_app(settings: AgentSettings):
    """Load the head and tokenizer, connect the edge pool (one address or several), return the FastAPI app."""
    from coinfer import compute
    from coinfer.model.tokenizer import Tokenizer
    from device_agent.api.app import create_app
    from device_agent.edge.client import EdgeAuth, EdgeError
    from device_agent.edge.pool import EdgePool
    from device_agent.generate import Engine
    from device_agent.head import HeadRunner

    if settings.torch_threads:
        compute.set_num_threads(settings.torch_threads)
    head = HeadRunner(
        settings.model_dir,
        settings.max_device_layers,
        settings.weights,
        settings.device_slowdown,
        compile_decode=settings.compile,
    )
    if settings.compile:
        log.info("decode step compiled: %s", f"{head.compile_seconds:.1f} s" if head.model.compiled else "no (eager)")
    edge = None
    if settings.edge:
        auth = EdgeAuth(settings.edge_ca_file, settings.edge_cert_file, settings.edge_key_file, settings.edge_token)
        edge = EdgePool(
            split_list(settings.edge),
            settings.connect_timeout_seconds,
            settings.request_timeout_seconds,
            settings.max_message_bytes,
            auth=auth,
        )
        if len(edge.clients) > 1:
            edge.rank()  # the nearest, least loaded edge serves first
        try:
            d = edge.describe()
            if d.fingerprint != head.fingerprint:
                log.error(
                    "edge %s serves other weights: edge %s, device %s", edge.address, d.fingerprint, head.fingerprint
                )
        except EdgeError as e:
            log.warning("edge %s not reachable at start (%s); will retry per request", edge.address, e.code.name)
    engine = Engine(settings, head, Tokenizer(settings.model_dir), edge)
    engine.planner.start()  # polls the edge's load, probes the link when estimates go stale
    return create_app(engine, settings.model_name or Path(settings.model_dir).resolve().name)


def build_parser() -> argparse.ArgumentParser:
    return app_parser(
        "device-agent",
        "coinfer device agent: OpenAI-compatible REST API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /healthz, /readyz, /metrics) that runs layers [0, k) of a split model here and "
        "the rest on an edge server.",
        AgentSettings,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_app_args(build_parser(), AgentSettings, argv)
    import uvicorn

    try:
        app = build_app(settings)
    except (OSError, ValueError) as e:
        print(f"device-agent: {e}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=logging.getLevelName(logging.getLogger().level).lower(),
        timeout_graceful_shutdown=10,
    )
    return serve(uvicorn.Server(config), settings.host)


def serve(server, host: str) -> int:
    """Run uvicorn in a thread (so that it leaves signals to us) until SIGTERM / SIGINT or its end."""
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)

    def start() -> str:
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.02)
        if not server.started:
            raise OSError("the HTTP server did not start (port in use?)")
        return f"http=http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=20)

    return run_until_signalled(start, stop, "device-agent", alive=thread.is_alive)


if __name__ == "__main__":
    sys.exit(main())
