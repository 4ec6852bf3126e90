"""A port in use fails an app at once, in one line naming the address and port, before any model
loads (loading takes seconds to minutes; the check a millisecond). Real sockets, so component; the
apps' other command-line behaviour is tested in tests/unit/test_cli_flags.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from coinfer.lifecycle import port_in_use, ports_in_use


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program listens on (a plain socket, as any other server would hold it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if either app starts loading its model."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    import device_agent.cli
    import edge_server.server

    monkeypatch.setattr(device_agent.cli, "load_head", loaded)
    monkeypatch.setattr(edge_server.server, "build_service", loaded)


def _run(main, argv: list[str]) -> tuple[int, float]:
    t0 = time.monotonic()
    rc = main(argv)
    return rc, time.monotonic() - t0


def test_agent_exits_at_once_when_its_rest_port_is_taken(held_port, no_model_load, capsys):
    from device_agent.cli import main

    rc, seconds = _run(main, ["--host", "127.0.0.1", "--port", str(held_port), "--edge", ""])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and seconds < 2
    assert err == f"device-agent: REST port {held_port} on 127.0.0.1 is already in use"


@pytest.mark.parametrize("which", ["--grpc-port", "--ops-port"])
def test_edge_exits_at_once_when_its_grpc_or_ops_port_is_taken(held_port, no_model_load, capsys, which):
    from edge_server.cli import main

    ports = {"--grpc-port": "0", "--ops-port": "0", which: str(held_port)}
    rc, seconds = _run(main, ["--host", "127.0.0.1", *(x for kv in ports.items() for x in kv)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and seconds < 2
    assert f"port {held_port} on 127.0.0.1 is already in use" in err and len(err.splitlines()) == 1
    assert ("gRPC" if which == "--grpc-port" else "ops") in err


def test_edge_refuses_one_port_for_both_servers(no_model_load, capsys):
    from edge_server.cli import main

    with socket.socket() as s:  # a port free now
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    rc, _ = _run(main, ["--host", "127.0.0.1", "--grpc-port", port, "--ops-port", port])
    assert rc != 0 and f"are both {port}" in capsys.readouterr().err


def test_a_free_port_and_port_zero_pass(held_port):
    assert port_in_use("127.0.0.1", held_port)
    assert not port_in_use("127.0.0.1", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert not port_in_use("127.0.0.1", free)
    assert ports_in_use("127.0.0.1", {"a": 0, "b": 0, "c": free}) is None


def test_grpc_bind_on_a_taken_port_is_an_os_error(held_port):
    """The moment between the check and the bind: newer grpcio raises RuntimeError there, which would
    end the edge with a traceback instead of its one line."""
    from grpc_health.v1 import health

    from coinfer.v1 import edge_pb2_grpc
    from edge_server.config import SecuritySettings, ServerSettings
    from edge_server.server import grpc_server

    server = ServerSettings(host="127.0.0.1", grpc_port=held_port)
    with pytest.raises(OSError, match=f"cannot bind gRPC to 127.0.0.1:{held_port}"):
        grpc_server(edge_pb2_grpc.EdgeInferenceServicer(), health.HealthServicer(), server, SecuritySettings())
