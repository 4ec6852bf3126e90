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
thread and this module only bridges Ray's async streams and context to it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from coinfer.v1 import edge_pb2 as pb
from edge_server.config import EdgeSettings

ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
SERVICER = "coinfer.v1.edge_pb2_grpc.add_EdgeInferenceServicer_to_server"
_END = object()


class StreamAborted(Exception):
    """The servicer aborted the stream; its status is on the Ray gRPC context."""


class RayContext:
    """The part of grpc.ServicerContext that EdgeService uses, over Ray Serve's gRPC context."""

    def __init__(self, ray_context, inbox: queue.Queue | None = None) -> None:
        self._ctx, self._inbox = ray_context, inbox
        self._callbacks: list = []

    def interrupt(self) -> None:
        """End the requests the servicer reads (a resume of the session arrived)."""
        if self._inbox is not None:
            self._inbox.put(None)

    def add_callback(self, fn) -> bool:
        self._callbacks.append(fn)
        return True

    def ended(self) -> None:
        for fn in self._callbacks:
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


class EdgeReplica:
    """One Ray Serve replica: the EdgeService of one edge process, without its gRPC server."""

    def __init__(self, settings: dict | None = None) -> None:
        from edge_server.server import build_service

        self.settings = EdgeSettings(**(settings or {}))
        self.service = build_service(self.settings)
        self._pool = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="session")

    async def Describe(self, request: pb.DescribeRequest) -> pb.DescribeResponse:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.service.Describe, request, None)

    async def Probe(self, request: pb.ProbeRequest) -> pb.ProbeResponse:
        return self.service.Probe(request, None)

    async def Generate(self, request_stream, grpc_context=None):
        """One session: Ray's async request stream -> the servicer's blocking iterator, its replies back."""
        inbox: queue.Queue = queue.Queue()
        ctx = RayContext(grpc_context, inbox)

        async def pump() -> None:
            try:
                async for msg in request_stream:
                    inbox.put(msg)
            except Exception:  # noqa: BLE001 - the client went away: same as a cancel
                ctx.ended()
            finally:
                if getattr(request_stream, "is_cancelled", lambda: False)():
                    ctx.ended()  # the device cancelled: a split-0 session stops generating
                inbox.put(None)  # half-close: the servicer sees the end of the requests

        pumping = asyncio.ensure_future(pump())
        replies = self.service.Generate(iter(inbox.get, None), ctx)
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
            inbox.put(None)
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


def application(settings: dict | None = None, replicas: int | None = None, max_replicas: int = 3,
                max_ongoing_requests: int = 32, num_cpus: float = 0.5):
    """The Serve application: EdgeReplica, consistent-hash routed on the session id, autoscaled
    between 1 and `max_replicas` by ongoing requests unless `replicas` fixes the count."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    scaling = {"num_replicas": replicas} if replicas else {"autoscaling_config": AutoscalingConfig(
        min_replicas=1, max_replicas=max_replicas, target_ongoing_requests=max(1, max_ongoing_requests // 2))}
    deployment = serve.deployment(
        EdgeReplica, name="EdgeReplica", max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER,
                                                  request_router_kwargs={"num_fallback_replicas": 0}),
        **scaling)
    return deployment.bind(settings or {})


def app_builder(args: dict):
    """For `serve run` / a Serve config file: args are EdgeSettings fields plus replicas / max_replicas."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 0)) or None
    max_replicas = int(args.pop("max_replicas", 3))
    return application(args, replicas=replicas, max_replicas=max_replicas)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_server.ray_serve",
                                description="Run the coinfer edge as a Ray Serve application on a local Ray "
                                            "(gRPC ingress on --grpc-port; settings from COINFER_* variables).")
    p.add_argument("--grpc-port", type=int, default=9000, help="Ray Serve gRPC proxy port")
    p.add_argument("--http-port", type=int, default=8000, help="Ray Serve HTTP proxy port (unused by coinfer)")
    p.add_argument("--replicas", type=int, default=0, help="fixed replica count (0 = autoscale 1..--max-replicas)")
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--model-dir", default=None, help="prepared model dir (default: COINFER_MODEL_DIR or the default)")
    a = p.parse_args(argv)
    try:
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions, HTTPOptions
    except ImportError:
        print("Ray Serve is not installed: pip install 'coinfer[ray]'", file=sys.stderr)
        return 1
    # the driver's COINFER_* environment, resolved here: replicas start in Ray's worker processes
    settings = EdgeSettings(**({"model_dir": a.model_dir} if a.model_dir else {})).model_dump()
    ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=a.http_port),
                grpc_options=gRPCOptions(port=a.grpc_port, grpc_servicer_functions=[SERVICER]))
    serve.run(application(settings, replicas=a.replicas or None, max_replicas=a.max_replicas),
              name="coinfer-edge", route_prefix="/")
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
