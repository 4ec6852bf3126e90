"""coinfer edge server: the tail of a split model over gRPC, with per-session KV caches.

tail.py (TailRunner), sessions.py (session store), scheduler.py (batched forwards),
session_protocol.py (one session, Open to Done), errors.py (its refusals), service.py (gRPC
servicer: admission, deadlines, statuses), metrics.py, api.py (ops HTTP), server.py (assembly),
ray_serve.py, config.py, cli.py (`edge-server`).
"""
