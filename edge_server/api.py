"""The edge's ops HTTP app (own port): liveness, readiness, Prometheus metrics, info, sessions.

With bearer tokens configured (auth_tokens) every endpoint but /healthz and /readyz needs one of
them, as gRPC does: what the edge serves and how loaded it is are not for anyone on the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coinfer.v1 import edge_pb2 as pb
from edge_server import security
from edge_server.service import EdgeService


def create_ops_app(service: EdgeService, tokens: Sequence[str] = ()) -> FastAPI:
    app = FastAPI(title="coinfer edge server (ops)", docs_url=None, redoc_url=None)
    auth = security.TokenAuth(list(tokens)) if tokens else None

    def authorized(request: Request) -> None:
        if auth is not None and not auth.allows(request.headers.items()):
            raise HTTPException(401, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if service.draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "active_sessions": len(service.sessions)})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", dependencies=[Depends(authorized)])
    def info() -> dict:
        return MessageToDict(service.Describe(pb.DescribeRequest(), None), preserving_proto_field_name=True)

    @app.get("/v1/sessions", dependencies=[Depends(authorized)])
    def sessions() -> dict:
        return {"sessions": service.sessions.snapshot()}

    return app
