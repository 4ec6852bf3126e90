"""GET /v1/plan: what split "auto" would choose now, why, and the predicted cost of every split."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from coinfer.codec import CODECS
from coinfer.planning.partitioner import PlanError
from device_agent.api.errors import APIError

router = APIRouter()


@router.get("/v1/plan")
async def get_plan(
    request: Request,
    prompt_tokens: int = Query(128, ge=1, le=1 << 20),
    max_tokens: int = Query(256, ge=1, le=1 << 20),
    codec: str | None = None,
    min_agreement: float | None = Query(None, ge=0.0, le=1.0),
) -> dict:
    planner = request.app.state.logic.engine.planner
    if codec is not None and codec not in CODECS:
        raise APIError(400, f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}", param="codec")
    try:
        plan = await run_in_threadpool(planner.plan, prompt_tokens, max_tokens, codec, min_agreement)
    except PlanError as e:
        raise APIError(409, str(e), code="no_feasible_split") from None
    return {
        "object": "plan",
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "split": plan.split,
        "codec": plan.codec,
        "reason": plan.reason,
        "objective": plan.objective,
        "predicted": plan.best.to_dict(),
        "per_split": [c.to_dict() for c in plan.per_split().values()],
        **planner.snapshot(),
    }
