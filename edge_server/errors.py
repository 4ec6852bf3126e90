"""The refusals a session raises; edge_server/service.py maps them (and the store's, scheduler's and
codec's errors) to gRPC statuses in one table.

The device retries by status (device_agent/edge/retry_policy.py): INVALID_ARGUMENT is the request's
fault and never retried, so it is kept for input the session sent: `BadInput`, raised by every
validation, and codec.CodecError (a frame that does not decode, or a session's own non-finite
state). A ValueError from anywhere else is a fault of the edge and answers INTERNAL.
"""

from __future__ import annotations

import grpc

from coinfer import wire


class BadInput(Exception):
    """The session's input is invalid (INVALID_ARGUMENT); the message tells the device what."""


class Abort(Exception):
    """A refusal with its own status: out of protocol order, a wrong fingerprint, draining, a
    session this replica does not hold, a full edge."""

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after: float | None = None, trailers: wire.Metadata = ()
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after, self.trailers = code, message, retry_after, trailers
