"""The device's edge-facing side: everything between a request's head and the edge's gRPC service.

client.py (one edge: channel, sessions as bidi streams, byte accounting), pool.py (several
edges behind the one-edge interface, failover), session_runner.py (EdgeRunner: a request's
edge sessions, replay and resume), retry_policy.py (the pure decision after a failed attempt),
head_caches.py (the head's KV kept for prefix reuse).

Why a subpackage: what happens when the link or the edge fails lives here and nowhere else in
device_agent; the REST API, the engine and the planner only see EdgeRunner, EdgePool and EdgeError.
"""
