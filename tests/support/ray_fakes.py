"""Stand-ins for Ray Serve's side of edge_server/ray_serve.py: the context Ray's proxy hands a replica,
a servicer that records its calls, and a replica with no model (the bridge alone)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from coinfer.v1 import edge_pb2 as pb
from edge_server import ray_serve, security


class FakeRayContext:
    """What Ray's proxy hands a replica (RayServegRPCContext): the client's metadata and peer."""

    def __init__(self, metadata=()) -> None:
        self.metadata, self.code, self.details = list(metadata), None, None

    def invocation_metadata(self):
        return self.metadata

    def auth_context(self):
        return {}

    def peer(self):
        return "ipv4:10.0.0.9:5555"

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        pass


class FakeService:
    def __init__(self, read_delay: float = 0.0) -> None:
        self.calls, self.read_delay, self.produced_before_second_read = [], read_delay, None
        self.received: list = []

    def Describe(self, request, context):
        self.calls.append("Describe")
        return pb.DescribeResponse(model="fake")

    def Probe(self, request, context):
        self.calls.append("Probe")
        return pb.ProbeResponse()

    def Generate(self, requests, context):
        self.calls.append(("Generate", security.identity(context)))
        it = iter(requests)
        for msg in it:
            self.received.append(msg)
            if len(self.received) == 1 and self.read_delay:
                time.sleep(self.read_delay)  # a slow edge: the device must wait, not pile up messages
                self.produced_before_second_read = self.producer[0]
        yield pb.EdgeMessage()


def ray_replica(tokens: list[str], service: FakeService) -> ray_serve.EdgeReplica:
    replica = ray_serve.EdgeReplica.__new__(ray_serve.EdgeReplica)  # no model: the bridge alone
    replica.auth, replica.service = ray_serve.TokenCheck(tokens), service
    replica._pool = ThreadPoolExecutor(4)
    return replica


def bearer(token: str):
    return [("session_id", "s"), ("authorization", f"Bearer {token}")]
