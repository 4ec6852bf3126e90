"""coinfer device agent: OpenAI-compatible REST on the device, the head of a split model.

head.py (HeadRunner), edge_client.py (gRPC sessions), generate.py (one request end to end),
text.py (streaming detokenization), api/ (REST), config.py, cli.py (`device-agent`).
"""
