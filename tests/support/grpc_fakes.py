"""A grpc.RpcError as the client raises it, for tests of how the device reads an edge's failure."""

from __future__ import annotations

import grpc


class FakeRpcError(grpc.RpcError):
    """An RpcError with a status code, details and trailing metadata, as grpc's call errors carry."""

    def __init__(self, code, details, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers
