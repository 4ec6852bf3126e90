"""Fixtures of every kind: tiny random Llama-family models written as HF dirs (built by
tests/support/tiny_model.py, once per run), and the real prepared model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coinfer.model.prepare import DEFAULT_MODEL_DIR
from tests.support.paths import REPO
from tests.support.tiny_model import TINY_VARIANTS, make_tiny_model_dir


@pytest.fixture(scope="session", autouse=True)
def _profile_cache(tmp_path_factory):
    """Measured cost profiles go to a per-run dir (shared by the servers the tests start), not ~/.cache."""
    if "COINFER_PROFILE_DIR" not in os.environ:
        os.environ["COINFER_PROFILE_DIR"] = str(tmp_path_factory.mktemp("profiles"))
    yield


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {v: make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{v}"), v) for v in TINY_VARIANTS}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The prepared SmolLM2 dir (`make model`). Skips, unless COINFER_REQUIRE_MODEL=1 makes it a failure."""
    path = Path(os.environ.get("COINFER_MODEL_DIR", REPO / DEFAULT_MODEL_DIR))
    if not (path / "coinfer.json").is_file():
        msg = f"no prepared model at {path}: run `make model` (or set COINFER_MODEL_DIR)"
        if os.environ.get("COINFER_REQUIRE_MODEL") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
