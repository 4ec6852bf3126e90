"""Edge server: runs the tail of the split model with per-session KV caches behind gRPC.
(Serving lands with the split-serving issue.)"""
