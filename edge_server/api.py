"""The edge's ops HTTP app (own port): liveness, readiness, Prometheus metrics, info, sessions."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coinfer.v1 import edge_pb2 as pb
from edge_server.service import EdgeService


def create_ops_app(service: EdgeService) -> FastAPI:
    app = FastAPI(title="coinfer edge server (ops)", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if service.draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "active_sessions": len(service.sessions)})

    @app.get("/metrics")
    def metrics() -> Response:
        service.update_gauges()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    def info() -> dict:
        return MessageToDict(service.Describe(pb.DescribeRequest(), None), preserving_proto_field_name=True)

    @app.get("/v1/sessions")
    def sessions() -> dict:
        return {"sessions": service.sessions.snapshot()}

    return app
