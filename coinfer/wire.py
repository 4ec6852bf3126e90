"""The wire contract beyond edge.proto: metadata, error trailers, channel options, limits, pseudo-codecs.

edge.proto fixes the messages; what rides beside them (gRPC metadata and trailers, the
HTTP/2 keepalive both ends must agree on, the sizes and counts the edge accepts, the codec
names that are not frames) is defined once here and read by the edge (edge_server/), the
device (device_agent/edge/client.py, pool.py) and the tools that speak to an edge, so
the two sides cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

# -- metadata ---------------------------------------------------------------------------------
# every error's status code again, in trailing metadata: a proxy that resets a stream after the
# edge's status (HAProxy) replaces that status with CANCELLED but passes the trailers on
STATUS_KEY = "coinfer-status"
RETRY_AFTER_KEY = "retry-after-ms"  # a full edge's hint, integer milliseconds
REPLAY_KEY = "coinfer-replay"  # on NOT_FOUND for a resume: the device must replay the history
SESSION_MISSING = "session-missing"  # REPLAY_KEY's value: this replica does not hold the session
# a session's affinity key, under both names the proxies hash on: nginx and HAProxy read the
# x-session-id header, Ray Serve's gRPC proxy reads session_id
AFFINITY_KEYS = ("x-session-id", "session_id")
AUTHORIZATION_KEY = "authorization"
BEARER = "Bearer "  # AUTHORIZATION_KEY's value: "Bearer <token>"

# -- limits -------------------------------------------------------------------------------------
RESUME_TOKEN_BYTES = 16  # Opened.resume_token: the capability to resume a session
MAX_SESSION_ID_CHARS = 128  # Open.session_id is 1..128 characters
MAX_OFFERS = 64  # Open.prefix_hashes: prefixes one Open may offer for reuse
MAX_STOP_IDS = 64  # Open.stop_ids: eos and a few stop tokens

# -- pseudo-codecs: what crosses the link at the splits that send no hidden-state frame ----------
TOKEN_IDS = "token_ids"  # split 0: the Prefill carries token ids and the edge runs every layer
NO_EDGE = "none"  # split N: the device runs every layer, nothing crosses
PSEUDO_CODECS = (TOKEN_IDS, NO_EDGE)


def split_codec(split: int, num_layers: int, codec: str) -> str:
    """What crosses the link at `split` of a `num_layers` model when frames would use `codec`."""
    if split == 0:
        return TOKEN_IDS
    if split >= num_layers:
        return NO_EDGE
    return codec


# -- channel options -----------------------------------------------------------------------------
# The device pings every KEEPALIVE_TIME_MS while a call is open, which must be no more often than
# the edge allows (MIN_PING_INTERVAL_MS), or the edge closes the connection (too_many_pings).
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 10_000
RECONNECT_BACKOFF_MS = (200, 2_000)  # device: first and longest wait before reconnecting


def _message_size(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The device's channel to an edge."""
    return [
        *_message_size(max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


def server_options(max_message_bytes: int, max_connection_idle_seconds: float = 300.0) -> list[tuple[str, int]]:
    """The edge's gRPC server: idle connections are closed, and a second edge on a port in use fails
    to bind instead of sharing it."""
    return [
        *_message_size(max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", int(max_connection_idle_seconds * 1000)),
        ("grpc.so_reuseport", 0),
    ]


# -- metadata helpers ------------------------------------------------------------------------------
Metadata = tuple[tuple[str, str], ...]


def affinity_metadata(key: str) -> Metadata:
    """Metadata that routes every stream of a session (or conversation) to one replica."""
    return tuple((name, key) for name in AFFINITY_KEYS)


def bearer_metadata(token: str) -> Metadata:
    return ((AUTHORIZATION_KEY, BEARER + token),) if token else ()


def bearer_token(metadata) -> str | None:
    """The bearer token in gRPC metadata (or HTTP headers with lower-case names); None without one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER) :]
    return None


# -- error trailers ------------------------------------------------------------------------------
def error_trailers(code: grpc.StatusCode, retry_after: float | None = None, extra: Metadata = ()) -> Metadata:
    """The trailing metadata of an error status: its code again, `extra`, and the retry hint (s)."""
    hint = ((RETRY_AFTER_KEY, str(int(retry_after * 1000))),) if retry_after is not None else ()
    return ((STATUS_KEY, code.name), *extra, *hint)


@dataclass(frozen=True)
class ErrorTrailers:
    """What an error's trailers told: the edge's status code (None: not told, or not a code) and its
    retry hint in seconds (None: none, or unreadable)."""

    code: grpc.StatusCode | None = None
    retry_after: float | None = None


def parse_error_trailers(metadata) -> ErrorTrailers:
    """Read error_trailers back; never raises, whatever a proxy or a stranger put there."""
    try:
        trailers = {k: v for k, v in metadata or () if isinstance(k, str)}
    except (TypeError, ValueError):
        return ErrorTrailers()
    told = trailers.get(STATUS_KEY)
    code = grpc.StatusCode.__members__.get(told) if isinstance(told, str) else None
    try:
        hint = trailers.get(RETRY_AFTER_KEY)
        retry_after = int(hint) / 1000 if hint is not None else None
    except (TypeError, ValueError):
        retry_after = None
    return ErrorTrailers(code, retry_after)
