"""/healthz (process alive), /readyz (can serve: edge reachable, or all layers here), /metrics.

/healthz and /metrics are async and quick, so they run on the event loop and need no worker thread:
generations cannot starve them by holding the thread pool. /readyz needs one thread for its edge
probe; the pool is sized above the generation cap (app.py) so one is always free.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from device_agent.edge.client import EdgeError

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    engine = request.app.state.logic.engine
    body = {"device_layers": engine.head.max_layers, "num_layers": engine.num_layers, "edge": None}
    if engine.edge is not None:
        try:
            d = await run_in_threadpool(engine.edge.describe, True, 1.0)  # probes must answer fast
            ok = d.fingerprint == engine.head.fingerprint
            body["edge"] = {
                "address": engine.edge.address,
                "status": "ok" if ok else "fingerprint mismatch",
                "fingerprint": d.fingerprint,
                "active_sessions": d.load.active_sessions,
            }
        except EdgeError as e:
            body["edge"] = {"address": engine.edge.address, "status": f"unreachable: {e.code.name}"}
    edge_ok = body["edge"] is not None and body["edge"]["status"] == "ok"
    ready = edge_ok or engine.head.holds_all_layers
    body["status"] = "ready" if ready else "not ready"
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.logic.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
