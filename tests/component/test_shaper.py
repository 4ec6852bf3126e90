"""The link shaper through a real proxy on loopback: rate, delay, live changes, and the `coinfer shape`
CLI. (Loopback only and unit parsing: tests/unit/test_shaper.py.)"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from coinfer.tools.shaper import Shaper


@pytest.fixture
def echo():
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(
                target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(65536), b"")], daemon=True
            ).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()
    srv.close()


def roundtrip(port: int, n: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        s.recv(1)  # connection established through the proxy
        t0 = time.perf_counter()
        s.sendall(b"y" * n)
        got = 0
        while got < n:
            got += len(s.recv(65536))
        return time.perf_counter() - t0


def test_delay_and_rate(echo):
    sh = Shaper(echo, rate_bits=0, delay=0.025)
    port = sh.start()
    try:
        assert roundtrip(port, 10) == pytest.approx(0.05, abs=0.015)  # RTT = 2 x one-way delay
        sh.set(rate_bits=1e6, delay=0.0)
        # n bytes up then back at r bit/s each way, pipelined chunk by chunk: (n + one chunk) * 8 / r
        assert roundtrip(port, 32 << 10) == pytest.approx((32 + 4) * 1024 * 8 / 1e6, rel=0.2)
        sh.set(rate_bits=256e3)  # live change, same proxy
        assert roundtrip(port, 8 << 10) == pytest.approx((8 + 4) * 1024 * 8 / 256e3, rel=0.2)
        assert sh.up.bytes >= (40 << 10) and sh.down.bytes >= (40 << 10)
    finally:
        sh.stop()


def test_coinfer_shape_cli_changes_the_link_live(echo):
    import subprocess
    import sys

    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coinfer.cli",
            "shape",
            "--target",
            f"127.0.0.1:{echo[1]}",
            "--listen",
            "127.0.0.1:0",
            "--rate",
            "1mbit",
            "--delay",
            "10ms",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = p.stdout.readline()
        assert ready.startswith("READY shaper 127.0.0.1:")
        port = int(ready.split()[2].rsplit(":", 1)[1])
        assert roundtrip(port, 10) == pytest.approx(0.02, abs=0.012)
        p.stdin.write("delay 40ms\n")
        p.stdin.flush()
        assert "delay 40.0 ms" in p.stdout.readline()
        assert roundtrip(port, 10) == pytest.approx(0.08, abs=0.015)
        p.stdin.write("rate nonsense\n")
        p.stdin.flush()
        assert "cannot read a rate" in p.stdout.readline()
    finally:
        p.terminate()
        p.wait(10)
