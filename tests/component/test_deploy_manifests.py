"""The Ray Serve bridge of deploy/ray (edge_server/ray_serve.py) driven with asyncio and its thread pool:
a replica refuses calls without a known token before the servicer runs, back-pressures a device that
sends faster than the edge reads, and its inbox is bounded and closes without blocking. (The
manifests themselves are checked in tests/unit/test_deploy_manifests.py.)"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from coinfer.v1 import edge_pb2 as pb
from edge_server import ray_serve, security
from tests.support.ray_fakes import FakeRayContext, FakeService, bearer, ray_replica


def test_ray_replica_refuses_calls_without_a_known_token_before_the_servicer_runs():
    service = FakeService()
    replica = ray_replica(["tok-a"], service)

    async def stream(n: int, counter: list[int] | None = None):
        for _ in range(n):
            if counter is not None:
                counter[0] += 1
            yield pb.DeviceMessage()

    async def generate(ctx):
        return [m async for m in replica.Generate(stream(3), ctx)]

    async def main():
        for call in (
            lambda c: replica.Describe(pb.DescribeRequest(), grpc_context=c),
            lambda c: replica.Probe(pb.ProbeRequest(), grpc_context=c),
            generate,
        ):
            for ctx in (FakeRayContext(), FakeRayContext(bearer("wrong"))):
                with pytest.raises(ray_serve.StreamAborted):
                    await call(ctx)
                assert ctx.code == grpc.StatusCode.UNAUTHENTICATED
        assert service.calls == []
        ok = FakeRayContext(bearer("tok-a"))
        assert (await replica.Describe(pb.DescribeRequest(), grpc_context=ok)).model == "fake"
        assert len(await generate(ok)) == 1 and ok.code is None

    try:
        asyncio.run(main())
    finally:
        replica._pool.shutdown()
    # the device's identity survives Ray's proxy: its token, not the proxy's or the peer's address
    assert service.calls[-1] == ("Generate", security.token_identity("tok-a"))


def test_ray_replica_back_pressures_a_device_that_sends_faster_than_the_edge_reads():
    service = FakeService(read_delay=0.5)
    produced = service.producer = [0]
    replica = ray_replica([], service)
    n = 5 * ray_serve.INBOX_MESSAGES

    async def flood():
        for i in range(n):
            produced[0] += 1
            yield pb.DeviceMessage(prefill=pb.Prefill(token_ids=[i]))

    async def main():
        return [m async for m in replica.Generate(flood(), FakeRayContext())]

    try:
        assert len(asyncio.run(main())) == 1
    finally:
        replica._pool.shutdown()
    # while the servicer held message 1, at most the inbox's worth (plus one awaiting room) was read
    assert service.produced_before_second_read <= 1 + ray_serve.INBOX_MESSAGES + 1
    assert [m.prefill.token_ids[0] for m in service.received] == list(range(n))  # nothing lost, in order


def test_ray_inbox_is_bounded_and_closes_without_blocking():
    inbox = ray_serve.Inbox(2)
    assert inbox.queue.maxsize == 2

    async def fill():
        assert await inbox.put(1) and await inbox.put(2)
        waiting = asyncio.ensure_future(inbox.put(3))
        await asyncio.sleep(0.05)
        assert not waiting.done() and inbox.queue.qsize() == 2  # full: the producer waits
        threading.Timer(0.05, inbox.close).start()  # a resume or deadline ends the stream meanwhile
        assert await waiting is False  # ... the waiting message is dropped, nothing blocks

    asyncio.run(fill())
    inbox.close()  # again, and while full: returns at once
    assert list(inbox) == [1, 2]  # the reader takes what was queued, then sees the end
