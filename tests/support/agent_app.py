"""A device agent on the tiny model alone (no edge), fresh apps on it with chosen limits, and an
engine that talks to one edge with replays on."""

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


def edge_engine(model_dir, port: int, split: int):
    """The agent's engine for one edge at 127.0.0.1:port, exact frames (f32), 3 replays."""
    settings = AgentSettings(
        model_dir=str(model_dir),
        edge=f"127.0.0.1:{port}",
        split=str(split),
        codec="f32",
        replays=3,
        connect_timeout_seconds=10,
    )
    return build_app(settings).state.logic.engine


def make_app(engine, **limits):
    """A fresh app on the shared engine, with these settings (the app reads its limits at creation)."""
    engine.settings = AgentSettings(**{**engine.settings.flat(), **limits})
    return create_app(engine, MODEL)


def completion(max_tokens: int = 4, **kw) -> dict:
    """A greedy /v1/completions body that generates exactly max_tokens tokens."""
    return {"model": MODEL, "prompt": "w1 w2 w3", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}
