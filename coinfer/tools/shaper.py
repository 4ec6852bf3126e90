"""A link shaper for tests and benchmarks: a TCP proxy on 127.0.0.1 with a rate and a delay.

Every byte crossing the proxy is serialized onto a per-direction link at `rate` bits/s
(chunks queue behind each other, as on a real bottleneck: a token bucket whose burst is one
chunk) and delivered `delay` seconds later (one-way propagation; RTT = 2 x delay). Both can
be changed while connections are open. Only loopback targets are allowed.

    shaper = Shaper(("127.0.0.1", 50051), rate_bits=1e6, delay=0.02); port = shaper.start()
    shaper.set(rate_bits=256e3)   # the link drops, live
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import threading
import time

CHUNK = 4096  # bytes serialized as one unit
MAX_QUEUED = 512 << 10  # bytes buffered per direction before the sender is pushed back


def parse_rate(text: str) -> float:
    """'256kbit', '2mbit', '20Mbit/s', '1e6', '0' / 'off' (unlimited) -> bits per second."""
    t = text.strip().lower().removesuffix("/s").removesuffix("ps")
    if t in ("0", "off", "none", "inf", "unlimited"):
        return 0.0
    m = re.fullmatch(r"([0-9.e+]+)\s*([kmg]?)(bit|b)?", t)
    if not m:
        raise ValueError(f"cannot read a rate from {text!r} (e.g. 256kbit, 2mbit, 20mbit)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def parse_duration(text: str) -> float:
    """'40ms', '0.04s', '40' (ms) -> seconds."""
    t = text.strip().lower()
    m = re.fullmatch(r"([0-9.e+]+)\s*(ms|s|us)?", t)
    if not m:
        raise ValueError(f"cannot read a duration from {text!r} (e.g. 40ms, 0.04s)")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "us": 1e-6, None: 1e-3}[m.group(2)]


class _Link:
    """One direction: when the link is free again, bytes carried."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.bytes = 0

    def schedule(self, n: int, rate_bits: float, delay: float) -> float:
        """Delivery time of an n-byte chunk sent now."""
        now = time.monotonic()
        start = max(now, self.free_at)
        self.free_at = start + (n * 8 / rate_bits if rate_bits > 0 else 0.0)
        self.bytes += n
        return self.free_at + delay


class Shaper:
    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        rate_bits: float = 0.0,
        delay: float = 0.0,
    ) -> None:
        for host in (target[0], listen[0]):
            if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
                raise ValueError(f"the shaper only proxies loopback addresses, not {host}")
        self.target, self.listen = target, listen
        self.rate_bits, self.delay = rate_bits, delay
        self.up, self.down = _Link(), _Link()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def set(self, rate_bits: float | None = None, delay: float | None = None) -> None:
        """Change the link now; chunks already on the wire keep their timing."""
        if rate_bits is not None:
            self.rate_bits = rate_bits
        if delay is not None:
            self.delay = delay

    def start(self) -> int:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, *self.listen))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="shaper", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.port

    def stop(self) -> None:
        """Close the listener and cut every proxied connection (both ends see a reset at once)."""
        loop, server = self._loop, self._server
        if loop is None:
            return

        async def shutdown() -> None:
            if server is not None:
                server.close()
            for w in self._writers:
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, self.up), self._pipe(up_reader, writer, self.down), return_exceptions=True
            )
        finally:
            self._writers.difference_update((writer, up_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        queued = [0]
        room = asyncio.Event()
        room.set()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, chunk = item
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
                queued[0] -= len(chunk)
                if queued[0] < MAX_QUEUED:
                    room.set()
            writer.close()

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(64 << 10):
                for i in range(0, len(data), CHUNK):
                    chunk = data[i : i + CHUNK]
                    queued[0] += len(chunk)
                    queue.put_nowait((link.schedule(len(chunk), self.rate_bits, self.delay), chunk))
                if queued[0] >= MAX_QUEUED:
                    room.clear()
                    await room.wait()
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            try:
                await task
            except (ConnectionError, OSError):
                pass


def main(argv: list[str]) -> int:
    """`coinfer shape`: run the proxy until Ctrl-C; lines on stdin ('rate 256kbit', 'delay 25ms') change it."""
    import argparse

    ap = argparse.ArgumentParser(prog="coinfer shape", description=main.__doc__)
    ap.add_argument("--target", default="127.0.0.1:50051", help="host:port to forward to (loopback)")
    ap.add_argument("--listen", default="127.0.0.1:60051", help="host:port to listen on (loopback)")
    ap.add_argument("--rate", default="0", help="link rate per direction, e.g. 256kbit, 2mbit (0 = unlimited)")
    ap.add_argument("--delay", default="0ms", help="one-way delay, e.g. 20ms (RTT = 2 x delay)")
    a = ap.parse_args(argv)
    th, tp = a.target.rsplit(":", 1)
    lh, lp = a.listen.rsplit(":", 1)
    try:
        s = Shaper((th, int(tp)), (lh, int(lp)), parse_rate(a.rate), parse_duration(a.delay))
    except ValueError as e:
        ap.error(str(e))
    s.start()
    print(f"READY shaper {lh}:{s.port} -> {a.target} rate {a.rate} delay {a.delay}", flush=True)
    import sys

    try:
        for line in sys.stdin:
            parts = line.split()
            try:
                if len(parts) == 2 and parts[0] == "rate":
                    s.set(rate_bits=parse_rate(parts[1]))
                elif len(parts) == 2 and parts[0] == "delay":
                    s.set(delay=parse_duration(parts[1]))
                elif parts:
                    print("commands: 'rate 256kbit', 'delay 20ms'", flush=True)
                    continue
                print(f"rate {s.rate_bits:.0f} bit/s delay {s.delay * 1e3:.1f} ms", flush=True)
            except ValueError as e:
                print(e, flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    s.stop()
    return 0
