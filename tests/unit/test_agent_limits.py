"""The device agent's own limits that need no connection: a chunked upload refused as soon as it passes
the body limit (the app driven as ASGI, no server), and which edge errors show their details to the
client. (Everything over a real connection or the TestClient: tests/component/test_agent_limits.py.)"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from device_agent.api.errors import from_edge
from device_agent.edge.client import EdgeError
from tests.support.agent_app import device_only_engine, make_app


@pytest.fixture(scope="module")
def engine(tiny_dir):
    with device_only_engine(tiny_dir) as e:
        yield e


def test_chunked_upload_is_refused_as_soon_as_it_passes_the_limit(engine):
    """Driven as ASGI: the agent stops reading once the chunks pass the limit, not at the end of the upload."""
    app = make_app(engine, max_request_bytes=4096)
    read, sent = [], []

    async def receive():
        read.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": len(read) < 1000}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert len(read) == 5  # 4 KiB fit, the fifth chunk passed the limit


# -- 5. error bodies --------------------------------------------------------------------------------
SECRET = "/srv/secret/token=hunter2"


@pytest.mark.parametrize(
    "code,status,shown",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, True),  # the request's fault: the edge's words help the client
        (grpc.StatusCode.UNAVAILABLE, 503, False),  # channel text: addresses of the edge
        (grpc.StatusCode.UNKNOWN, 502, False),  # an edge handler's exception text
    ],
)
def test_edge_error_details_reach_the_client_only_when_the_request_caused_them(code, status, shown):
    err = from_edge(EdgeError(code, f"Exception calling application: {SECRET}"))
    assert err.status == status and (SECRET in err.message) == shown
