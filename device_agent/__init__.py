"""coinfer device agent: OpenAI-compatible REST on the device, the head of a split model.

head.py (HeadRunner), generate.py (one request end to end), edge/ (gRPC sessions with the edge,
failover, retries, head caches for prefix reuse), planning.py (live estimates for the partitioner
in coinfer.planning), text.py (streaming detokenization), api/ (REST), config.py, cli.py
(`device-agent`).
"""
