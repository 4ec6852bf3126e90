"""`device-agent`: the OpenAI-compatible REST API on the device, running the head of a split model."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from coinfer.lifecycle import ports_in_use, run_until_signalled
from coinfer.settings_cli import app_parser, parse_app_args
from device_agent.config import AgentSettings, RuntimeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from device_agent.head import HeadRunner

log = logging.getLogger("coinfer.device")


def load_head(runtime: RuntimeSettings, slowdown: float = 1.0) -> HeadRunner:
    """The device's layers as the runtime settings say. slowdown > 1 emulates a slower device, for
    benchmarks only (benchmarks/emulated_device.py): no setting reaches it."""
    from coinfer import compute
    from device_agent.head import HeadRunner

    if runtime.torch_threads:
        compute.set_num_threads(runtime.torch_threads)
    head = HeadRunner(
        runtime.model_dir, runtime.max_device_layers, runtime.weights, slowdown, compile_decode=runtime.compile
    )
    if runtime.compile:
        log.info("decode step compiled: %s", f"{head.compile_seconds:.1f} s" if head.model.compiled else "no (eager)")
    return head


def build_app(settings: AgentSettings, head: HeadRunner | None = None) -> FastAPI:
    """Load the head (unless given) and tokenizer, connect the edge pool (one address or several),
    return the FastAPI app."""
    from coinfer.model.tokenizer import Tokenizer
    from device_agent.api.app import create_app
    from device_agent.edge.client import EdgeError
    from device_agent.edge.pool import EdgePool
    from device_agent.generate import Engine

    if head is None:
        head = load_head(settings.runtime)
    edge = None
    if settings.connection.edge:
        edge = EdgePool.from_settings(settings.connection)
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
    model_dir = settings.runtime.model_dir
    engine = Engine(settings, head, Tokenizer(model_dir), edge)
    engine.planner.start()  # polls the edge's load, probes the link when estimates go stale
    return create_app(engine, settings.api.model_name or Path(model_dir).resolve().name)


def build_parser() -> argparse.ArgumentParser:
    return app_parser(
        "device-agent",
        "coinfer device agent: OpenAI-compatible REST API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /healthz, /readyz, /metrics) that runs layers [0, k) of a split model here and "
        "the rest on an edge server.",
        AgentSettings,
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse_app_args(build_parser(), AgentSettings, argv))


def run(settings: AgentSettings, build: Callable[[AgentSettings], FastAPI] = build_app) -> int:
    """Build the app with `build` and serve it until SIGTERM / SIGINT; 1 when it cannot be built, or at
    once when its port is taken (before the model loads, which takes far longer than the check)."""
    api = settings.api
    problem = ports_in_use(api.host, {"REST port": api.port})
    if problem:
        print(f"device-agent: {problem}", file=sys.stderr)
        return 1
    import uvicorn

    try:
        app = build(settings)
    except (OSError, ValueError) as e:
        print(f"device-agent: {e}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        app,
        host=api.host,
        port=api.port,
        log_level=logging.getLevelName(logging.getLogger().level).lower(),
        timeout_graceful_shutdown=10,
    )
    return serve(uvicorn.Server(config), api.host)


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
