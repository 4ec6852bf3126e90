"""GET /v1/models: the one model this agent serves; GET /v1/models/{id}: that model, 404 for another."""

from __future__ import annotations

from fastapi import APIRouter, Request

from device_agent.api import protocol as p

router = APIRouter()


def _card(request: Request) -> p.ModelCard:
    logic = request.app.state.logic
    return p.ModelCard(id=logic.model_name, created=logic.created)


@router.get("/v1/models", response_model=p.ModelList)
async def list_models(request: Request) -> p.ModelList:
    return p.ModelList(data=[_card(request)])


@router.get("/v1/models/{model_id:path}", response_model=p.ModelCard)
async def retrieve_model(model_id: str, request: Request) -> p.ModelCard:
    """As OpenAI's retrieve: the card, or 404 `model_not_found` (an id may hold slashes: org/name)."""
    request.app.state.logic.check_model(model_id)
    return _card(request)
