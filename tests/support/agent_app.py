"""A device agent on the tiny model alone (no edge), and fresh apps on it with chosen limits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from device_agent.api.app import create_app
from device_agent.cli import build_app
from device_agent.config import AgentSettings

N = 6  # layers of the tiny model: split N = the device alone
MODEL = "tiny"


@contextmanager
def device_only_engine(model_dir) -> Iterator:
    """The agent's engine at split N with no edge; its settings are restored afterwards (make_app changes them)."""
    e = build_app(AgentSettings(model_dir=str(model_dir), edge="", split=str(N))).state.logic.engine
    base = e.settings
    try:
        yield e
    finally:
        e.settings = base


def make_app(engine, **limits):
    """A fresh app on the shared engine, with these settings (the app reads its limits at creation)."""
    engine.settings = AgentSettings(**{**engine.settings.model_dump(), **limits})
    return create_app(engine, MODEL)


def completion(max_tokens: int = 4, **kw) -> dict:
    """A greedy /v1/completions body that generates exactly max_tokens tokens."""
    return {"model": MODEL, "prompt": "w1 w2 w3", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **kw}
