"""The edge's wire checks on prefix offers and block hashes, and chunked prefill, on a live edge (the
store itself: tests/unit/test_session_store.py)."""

from __future__ import annotations

import grpc
import pytest

from coinfer.v1 import edge_pb2 as pb
from tests.support.edge import edge_server, open_msg, session, stub
from tests.support.reference import hidden_frame


@pytest.mark.parametrize(
    "bad",
    [
        {"prefix_hashes": [b"short"], "prefix_lengths": [16]},
        {"prefix_hashes": [bytes(16)], "prefix_lengths": []},
        {"prefix_hashes": [bytes(16)] * 65, "prefix_lengths": [16] * 65},
    ],
)
def test_malformed_prefix_offers_are_invalid_argument(tiny_dir, bad):
    with edge_server(tiny_dir) as edge, stub(f"127.0.0.1:{edge.grpc_port}") as s:
        fp = edge.service.runner.fingerprint
        with pytest.raises(grpc.RpcError) as e:
            session(s, [open_msg(fp, 0, **bad)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # an offer the edge does not hold is no error: it holds 0
        replies = session(
            s,
            [
                open_msg(fp, 0, max_new=2, prefix_hashes=[bytes(16)], prefix_lengths=[16]),
                pb.DeviceMessage(prefill=pb.Prefill(token_ids=list(range(20)))),
            ],
        )
        assert replies[0].opened.cached_tokens == 0 and replies[-1].WhichOneof("kind") == "done"
        # block hashes that do not cover the blocks the prefill completes
        for hashes, state in (([bytes(16)] * 3, bytes(16)), ([bytes(16)], b"x")):
            with pytest.raises(grpc.RpcError) as e:
                session(
                    s,
                    [
                        open_msg(fp, 3),
                        pb.DeviceMessage(
                            prefill=pb.Prefill(
                                frame=hidden_frame(tiny_dir, list(range(20)), 3), block_hashes=hashes, chain_state=state
                            )
                        ),
                    ],
                )
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "block_hashes" in e.value.details()
        replies = session(s, [open_msg(fp, 0, max_new=3), pb.DeviceMessage(prefill=pb.Prefill(token_ids=[1, 2, 3]))])
        assert replies[-1].WhichOneof("kind") == "done"  # still serving


def test_chunked_prefill_equals_one_shot(tiny_dir):
    ids = list(range(3, 90))
    outs = []
    for chunk in (1000, 7):
        with (
            edge_server(tiny_dir, prefill_chunk_tokens=chunk, prefix_reuse=False) as edge,
            stub(f"127.0.0.1:{edge.grpc_port}") as s,
        ):
            replies = session(
                s,
                [
                    open_msg(edge.service.runner.fingerprint, 0, max_new=6),
                    pb.DeviceMessage(prefill=pb.Prefill(token_ids=ids)),
                ],
            )
            outs.append([r.token.id for r in replies if r.WhichOneof("kind") == "token"])
            chunks = next(
                m.samples[0].value
                for m in edge.service.metrics.registry.collect()
                if m.name == "coinfer_prefill_chunks"
            )
            assert chunks == (1 if chunk == 1000 else -(-len(ids) // 7))
    assert outs[0] == outs[1] and len(outs[0]) == 6
