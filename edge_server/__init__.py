"""coinfer edge server: the tail of a split model over gRPC, with per-session KV caches.

tail.py (TailRunner), sessions.py (session store), service.py (gRPC servicer),
api.py (ops HTTP), server.py (assembly), config.py, cli.py (`edge-server`).
"""
