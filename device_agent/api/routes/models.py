"""GET /v1/models: the one model this agent serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from device_agent.api import protocol as p

router = APIRouter()


@router.get("/v1/models", response_model=p.ModelList)
def list_models(request: Request) -> p.ModelList:
    logic = request.app.state.logic
    return p.ModelList(data=[p.ModelCard(id=logic.model_name, created=logic.created)])
