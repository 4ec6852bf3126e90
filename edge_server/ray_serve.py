"""The edge as a Ray Serve application: EdgeService replicas behind Ray's gRPC proxy.

Each replica is one EdgeService (model, session store, batching scheduler), as in one
`edge-server` process. Ray Serve's gRPC ingress (bidi streams from Ray 2.55) carries the
`Generate` stream to a replica; its ConsistentHashRouter (Ray 2.56, experimental) routes on
the `session_id` metadata every device sends, so every stream of a session (a resume after a
broken stream) reaches the replica that holds its KV cache. Autoscaling adds replicas by
ongoing requests; a session that lands on a new replica replays (NOT_FOUND + coinfer-replay).

    pip install 'coinfer[ray]'
    serve run deploy/ray/serve_config.yaml          # or: python -m edge_server.ray_serve --replicas 3

The servicer stays synchronous (it blocks on the scheduler); each stream runs it in a worker
thread and this module only bridges Ray's async streams and context to it. A stream's requests
wait in a bounded inbox (INBOX_MESSAGES): a device that sends faster than its session consumes is
back-pressured (its messages stay in flow control), not buffered without limit.

Security, as in `edge-server` (edge_server/security.py):
- Tokens: with `auth_tokens` set (or `auth_tokens_file`, or COINFER_AUTH_TOKENS in the replicas'
  environment), every Describe / Probe / Generate must carry `authorization: Bearer <token>`;
  a missing or unknown token is UNAUTHENTICATED before the servicer runs (the same bearer parsing
  and constant-time compare as TokenAuth). Ray's gRPC proxy forwards the metadata to the replica,
  so each device keeps its own identity (kept prefix caches, per-client limits) behind the proxy.
- TLS: Ray Serve's gRPC proxy (Ray 2.60) binds only a plaintext port (`add_insecure_port`), so
  the TLS settings cannot apply here and setting one is an error rather than a silently plaintext
  edge: terminate TLS in front of Ray's proxy (an nginx `listen ... ssl` + `grpc_pass`, or a load
  balancer) and keep the proxy port on a private network. The token check applies either way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import re
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from coinfer.v1 import edge_pb2 as pb
from edge_server import security
from edge_server.config import EdgeSettings

ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
SERVICER = "coinfer.v1.edge_pb2_grpc.add_EdgeInferenceServicer_to_server"
_END = object()
INBOX_MESSAGES = 8  # requests of one stream waiting for the servicer; beyond it the device is back-pressured
TLS_SETTINGS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
UNAUTHENTICATED = security.UNAUTHENTICATED


class StreamAborted(Exception):
    """The servicer aborted the stream; its status is on the Ray gRPC context."""


class Inbox:
    """One stream's requests, from Ray's event loop to the servicer's thread.

    At most `maxsize` wait (a queue.Queue with that maxsize): `put` awaits room without blocking
    the event loop, so a device that sends faster than the edge consumes is back-pressured, never
    buffered without bound. `close` ends the requests from any thread without blocking, even when
    the queue is full: the reader takes what is already queued, then sees the end."""

    def __init__(self, maxsize: int = INBOX_MESSAGES) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize)
        self._closed = threading.Event()

    async def put(self, msg) -> bool:
        """Queue one request, waiting for room; False once the inbox is closed (the message is dropped)."""
        delay = 0.001
        while not self._closed.is_set():
            try:
                self.queue.put_nowait(msg)
                return True
            except queue.Full:
                await asyncio.sleep(delay)  # the servicer frees a slot per message it takes
                delay = min(2 * delay, 0.05)
        return False

    def close(self) -> None:
        self._closed.set()
        try:
            self.queue.put_nowait(None)  # wakes a reader blocked on an empty queue
        except queue.Full:
            pass  # the reader is not blocked: it drains the queue, then sees `closed`

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __iter__(self):
        while True:
            if self._closed.is_set() and self.queue.empty():
                return
            msg = self.queue.get()
            if msg is None:
                return
            yield msg


class RayContext:
    """The part of grpc.ServicerContext that EdgeService uses, over Ray Serve's gRPC context."""

    def __init__(self, ray_context, inbox: Inbox | None = None) -> None:
        self._ctx, self._inbox = ray_context, inbox
        self._callbacks: list = []
        self._lock = threading.Lock()
        self._done = False

    def cancel(self) -> None:
        """End this RPC from another thread, as grpc's context.cancel() does (a resume of the session
        arrived, or a deadline passed): the requests the servicer reads end and the callbacks run."""
        if self._inbox is not None:
            self._inbox.close()
        self.ended()

    def add_callback(self, fn) -> bool:
        with self._lock:
            if self._done:
                return False  # as grpc: the RPC is over already
            self._callbacks.append(fn)
            return True

    def ended(self) -> None:
        """The RPC is over: run the callbacks, once."""
        with self._lock:
            callbacks, self._callbacks, self._done = self._callbacks, [], True
        for fn in callbacks:
            fn()

    def auth_context(self) -> dict:
        return self._ctx.auth_context() if self._ctx is not None else {}

    def invocation_metadata(self):
        return self._ctx.invocation_metadata() if self._ctx is not None else []

    def peer(self) -> str:
        return self._ctx.peer() if self._ctx is not None else "ray:local"

    def set_trailing_metadata(self, metadata) -> None:
        if self._ctx is not None:
            self._ctx.set_trailing_metadata(list(metadata))

    def abort(self, code: grpc.StatusCode, details: str):
        if self._ctx is not None:
            self._ctx.set_code(code)
            self._ctx.set_details(details)
        raise StreamAborted(f"{code.name}: {details}")


def parse_tokens(text: str) -> list[str]:
    """Tokens separated by commas or whitespace (COINFER_AUTH_TOKENS, or a mounted token file)."""
    return [t for t in re.split(r"[,\s]+", text or "") if t]


def check_no_tls(settings: dict | EdgeSettings) -> None:
    """Ray's gRPC proxy serves plaintext only: a TLS setting here is refused, not silently ignored."""
    flat = settings if isinstance(settings, dict) else settings.flat()
    given = [k for k in TLS_SETTINGS if flat.get(k, "")]
    if given:
        raise ValueError(
            f"{', '.join(given)}: Ray Serve's gRPC proxy cannot terminate TLS (it binds a plaintext "
            "port); terminate TLS in front of it (nginx `listen ... ssl` + grpc_pass, or a load "
            "balancer) and leave these unset. Bearer tokens (auth_tokens) still apply."
        )


class TokenCheck:
    """edge_server.security's bearer-token rule for calls that reach a replica through Ray's proxy
    (no grpc interceptor runs there): coinfer.wire.bearer_token parses the metadata and TokenAuth's
    constant-time comparison decides."""

    def __init__(self, tokens: list[str]) -> None:
        self._auth = security.TokenAuth(tokens) if tokens else None

    @property
    def enabled(self) -> bool:
        return self._auth is not None

    def allows(self, grpc_context) -> bool:
        if self._auth is None:
            return True
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        return self._auth.allows(metadata)

    def require(self, grpc_context) -> None:
        """UNAUTHENTICATED on the Ray context (StreamAborted) unless the call carries a known token."""
        if not self.allows(grpc_context):
            RayContext(grpc_context).abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


class EdgeReplica:
    """One Ray Serve replica: the EdgeService of one edge process, without its gRPC server.

    `auth_tokens_file`: a file on every node (e.g. a mounted Secret) whose tokens, separated by
    commas or newlines, are accepted in addition to `auth_tokens`."""

    def __init__(self, settings: dict | None = None, auth_tokens_file: str = "") -> None:
        from edge_server.server import build_service

        self.settings = EdgeSettings(**(settings or {}))
        check_no_tls(self.settings)
        tokens = parse_tokens(self.settings.security.auth_tokens)
        if auth_tokens_file:
            with open(auth_tokens_file, encoding="utf-8") as f:
                listed = parse_tokens(f.read())
            if not listed:  # a file was meant to turn tokens on: an empty one must not turn them off
                raise ValueError(f"auth_tokens_file {auth_tokens_file} lists no token")
            tokens += listed
        self.auth = TokenCheck(tokens)
        self.service = build_service(self.settings)
        self.service.tokens_required = bool(tokens)
        self._pool = ThreadPoolExecutor(max_workers=self.settings.server.workers, thread_name_prefix="session")

    async def Describe(self, request: pb.DescribeRequest, grpc_context=None) -> pb.DescribeResponse:
        self.auth.require(grpc_context)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.service.Describe, request, None)

    async def Probe(self, request: pb.ProbeRequest, grpc_context=None) -> pb.ProbeResponse:
        self.auth.require(grpc_context)
        return self.service.Probe(request, None)

    async def Generate(self, request_stream, grpc_context=None):
        """One session: Ray's async request stream -> the servicer's blocking iterator, its replies back."""
        self.auth.require(grpc_context)  # before anything is read or started
        inbox = Inbox(INBOX_MESSAGES)
        ctx = RayContext(grpc_context, inbox)

        async def pump() -> None:
            try:
                async for msg in request_stream:
                    if not await inbox.put(msg):  # back-pressure: waits while the inbox is full
                        break  # the stream was ended (resume elsewhere, deadline): stop reading
            except Exception:  # noqa: BLE001 - the client went away: same as a cancel
                ctx.ended()
            finally:
                if getattr(request_stream, "is_cancelled", lambda: False)():
                    ctx.ended()  # the device cancelled: a split-0 session stops generating
                inbox.close()  # half-close: the servicer sees the end of the requests

        pumping = asyncio.ensure_future(pump())
        replies = self.service.Generate(iter(inbox), ctx)
        pending = None
        try:
            while True:
                pending = self._pool.submit(next, replies, _END)
                msg = await asyncio.wrap_future(pending)
                if msg is _END:
                    break
                yield msg
        finally:
            ctx.ended()
            pumping.cancel()
            inbox.close()
            # let the step in flight finish, then close the servicer's generator (it keeps a
            # broken-off session's cache), off this event loop and without awaiting: a cancelled
            # request must not wait here
            self._pool.submit(_close_after, pending, replies)


def _close_after(pending, replies) -> None:
    if pending is not None:
        try:
            pending.result()
        except Exception:  # noqa: BLE001 - its outcome already went to the client
            pass
    replies.close()


def application(
    settings: dict | None = None,
    replicas: int | None = None,
    max_replicas: int = 3,
    max_ongoing_requests: int = 32,
    num_cpus: float = 0.5,
    auth_tokens_file: str = "",
):
    """The Serve application: EdgeReplica, consistent-hash routed on the session id, autoscaled
    between 1 and `max_replicas` by ongoing requests unless `replicas` fixes the count."""
    check_no_tls(settings or {})  # here already, not only in every replica
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    scaling = (
        {"num_replicas": replicas}
        if replicas
        else {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=1, max_replicas=max_replicas, target_ongoing_requests=max(1, max_ongoing_requests // 2)
            )
        }
    )
    # ray annotates RequestRouterConfig.__init__(**kwargs: dict[str, Any]): every keyword a dict, wrongly
    router = RequestRouterConfig(
        request_router_class=ROUTER,  # type: ignore[arg-type]
        request_router_kwargs={"num_fallback_replicas": 0},
    )
    deployment = serve.deployment(
        name="EdgeReplica",
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
        request_router_config=router,
        **scaling,
    )(EdgeReplica)
    return deployment.bind(settings or {}, auth_tokens_file)


APP_ARGS = ("replicas", "max_replicas", "auth_tokens_file")  # app_builder args that are not EdgeSettings fields


def app_builder(args: dict):
    """For `serve run` / a Serve config file: args are EdgeSettings fields plus replicas / max_replicas
    and auth_tokens_file (read by every replica; see EdgeReplica)."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 0)) or None
    max_replicas = int(args.pop("max_replicas", 3))
    tokens_file = str(args.pop("auth_tokens_file", "") or "")
    return application(args, replicas=replicas, max_replicas=max_replicas, auth_tokens_file=tokens_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m edge_server.ray_serve",
        description="Run the coinfer edge as a Ray Serve application on a local Ray "
        "(gRPC ingress on --grpc-port; settings from COINFER_* variables).",
    )
    p.add_argument("--grpc-port", type=int, default=9000, help="Ray Serve gRPC proxy port")
    p.add_argument("--http-port", type=int, default=8000, help="Ray Serve HTTP proxy port (unused by coinfer)")
    p.add_argument("--replicas", type=int, default=0, help="fixed replica count (0 = autoscale 1..--max-replicas)")
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--model-dir", default=None, help="prepared model dir (default: COINFER_MODEL_DIR or the default)")
    p.add_argument(
        "--auth-tokens-file",
        default="",
        help="file of accepted bearer tokens (commas or newlines), in addition to COINFER_AUTH_TOKENS",
    )
    a = p.parse_args(argv)
    try:
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions, gRPCOptions
    except ImportError:
        print("Ray Serve is not installed: pip install 'coinfer[ray]'", file=sys.stderr)
        return 1
    # the driver's COINFER_* environment, resolved here: replicas start in Ray's worker processes
    settings = EdgeSettings(**({"model_dir": a.model_dir} if a.model_dir else {})).flat()
    try:
        check_no_tls(settings)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=a.http_port),
        grpc_options=gRPCOptions(port=a.grpc_port, grpc_servicer_functions=[SERVICER]),
    )
    serve.run(
        application(
            settings,
            replicas=a.replicas or None,
            max_replicas=a.max_replicas,
            auth_tokens_file=os.path.abspath(a.auth_tokens_file) if a.auth_tokens_file else "",
        ),
        name="coinfer-edge",
        route_prefix="/",
    )
    print(f"READY pid={os.getpid()} grpc=127.0.0.1:{a.grpc_port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
