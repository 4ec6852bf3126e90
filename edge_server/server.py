"""Assembles the edge: TailRunner + gRPC server (service, health, reflection) + ops HTTP app.

`EdgeServer.start()` returns once both ports listen; `stop()` drains: health goes
NOT_SERVING, new sessions get UNAVAILABLE, in-flight ones get `grace_seconds` to finish.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coinfer import compute, wire
from coinfer.config_values import split_list
from coinfer.v1 import edge_pb2, edge_pb2_grpc
from edge_server import security
from edge_server.api import create_ops_app
from edge_server.config import EdgeSettings, SecuritySettings, ServerSettings
from edge_server.metrics import EdgeMetrics
from edge_server.service import EdgeService
from edge_server.tail import TailRunner

log = logging.getLogger("coinfer.edge")
SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeInference"].full_name


def build_service(settings: EdgeSettings) -> EdgeService:
    """The servicer with its model, sessions and scheduler (no server): EdgeServer and the Ray Serve
    replica (edge_server.ray_serve) both serve one."""
    rt = settings.runtime
    if rt.torch_threads:
        compute.set_num_threads(rt.torch_threads)
    runner = TailRunner(
        rt.model_dir,
        rt.min_split,
        settings.limits.max_frame_bytes,
        rt.weights,
        rt.profile_dir or None,
        rt.profile,
        settings.kv.kv_chunk_tokens,
    )
    return EdgeService(runner, settings, EdgeMetrics())


def grpc_server(
    service: EdgeService, health_servicer: health.HealthServicer, server: ServerSettings, sec: SecuritySettings
) -> tuple[grpc.Server, int]:
    """The gRPC server of `service`, with health and reflection, bound as the server and security
    settings say; returns it and the port it got."""
    tokens = split_list(sec.auth_tokens)
    # maximum_concurrent_rpcs bounds the calls queued for a thread; Generate streams are capped
    # below the thread count by the servicer (max_streams), so health and Describe always get one
    srv = grpc.server(
        futures.ThreadPoolExecutor(max_workers=server.workers),
        options=wire.server_options(server.max_message_bytes, server.max_connection_idle_seconds),
        maximum_concurrent_rpcs=4 * server.workers,
        interceptors=[security.TokenAuth(tokens)] if tokens else None,
    )
    edge_pb2_grpc.add_EdgeInferenceServicer_to_server(service, srv)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, srv)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), srv
    )
    bind = f"{server.host}:{server.grpc_port}"
    if bool(sec.tls_cert_file) != bool(sec.tls_key_file) or (sec.tls_client_ca_file and not sec.tls_cert_file):
        raise ValueError("TLS needs tls_cert_file and tls_key_file together (and both for tls_client_ca_file)")
    creds = None
    if sec.tls_cert_file:
        creds = security.server_credentials(sec.tls_cert_file, sec.tls_key_file, sec.tls_client_ca_file)
    try:  # a port in use: older grpcio returns 0, newer raises RuntimeError; either is one line for the CLI
        port = srv.add_secure_port(bind, creds) if creds is not None else srv.add_insecure_port(bind)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind gRPC to {bind}")
    return srv, port


class EdgeServer:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings, server = settings, settings.server
        self.service = build_service(settings)
        self.health = health.HealthServicer()
        tokens = split_list(settings.security.auth_tokens)
        self.service.tokens_required = bool(tokens)
        if any(t.startswith("dev-only") for t in tokens):
            log.warning(
                "auth_tokens include the public dev-only tokens of docker-compose.yml: for local "
                "try-outs only (set COINFER_AGENT_TOKEN and friends, see deploy/compose.env.example)"
            )
        self.grpc, self.grpc_port = grpc_server(self.service, self.health, server, settings.security)
        self._ops = uvicorn.Server(
            uvicorn.Config(
                create_ops_app(self.service, tokens if settings.security.ops_auth else []),
                host=server.host,
                port=server.ops_port,
                log_level="warning",
                lifespan="off",
            )
        )
        self._ops_thread = threading.Thread(target=self._ops.run, name="ops-http", daemon=True)

    @property
    def ops_port(self) -> int:
        return self._ops.servers[0].sockets[0].getsockname()[1] if self._ops.started else 0

    def start(self) -> None:
        self.grpc.start()
        self._ops_thread.start()
        while not self._ops.started and self._ops_thread.is_alive():
            threading.Event().wait(0.02)
        if not self._ops.started:
            server = self.settings.server
            raise OSError(f"ops HTTP server failed to start on {server.host}:{server.ops_port}")
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "edge ready: gRPC %s:%d, ops http://%s:%d, layers [%d, %d), fingerprint %s",
            self.settings.server.host,
            self.grpc_port,
            self.settings.server.host,
            self.ops_port,
            self.service.runner.min_split,
            self.service.runner.cfg.num_layers,
            self.service.runner.fingerprint,
        )

    def stop(self, grace: float | None = None) -> None:
        grace = self.settings.server.grace_seconds if grace is None else grace
        log.info("edge draining (grace %.1f s)", grace)
        self.service.draining.set()
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait()
        self.service.scheduler.close()
        self.service.deadlines.close()
        self._ops.should_exit = True
        self._ops_thread.join(timeout=5)
        log.info("edge stopped")

    def wait(self) -> None:
        self.grpc.wait_for_termination()
