"""Edge throughput under concurrent sessions: batched decoding vs one session per forward.

A real edge-server process on 127.0.0.1 and real gRPC clients (threads of this process),
fixed split k. At k = 0 a client sends token ids and the edge generates on its own. At
k = 15 a client replays hidden-state frames precomputed by a real device head (f32) along
the greedy path, so the clients cost the shared CPU almost nothing and the edge computes
exactly what it would for live devices. For 1, 4, 16 and 32 concurrent sessions, all
started at once (each `--new-tokens` greedy tokens, prompts of 48..76 tokens): aggregate tokens/s, p50/p99
inter-token latency seen by the clients, mean decode batch size (from the edge's
/metrics). Each load runs against an edge with batching (`--max-batch 32`) and one
without (`--max-batch 1`), alternately. Target: at 16 sessions >= 4x the single-session
aggregate. Prints a table, writes benchmarks/results/edge_concurrency.json and .png.

    python benchmarks/edge_concurrency.py [--model models/smollm2-135m-instruct] [--new-tokens 128]
"""

from __future__ import annotations

import os
import platform
import queue
import statistics
import threading
import time
from itertools import pairwise
from pathlib import Path

import grpc
import httpx
import torch
from _common import RESULTS, parser, pyplot, write_results

from coinfer import codec
from coinfer.config_values import split_list
from coinfer.model import load_slice
from coinfer.model.generation import generate, model_step
from coinfer.model.tokenizer import Tokenizer
from coinfer.model.weights import read_fingerprint
from coinfer.tools.launcher import start_edge
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc

LOADS = (1, 4, 16, 32)
SPLITS = (0, 15)
N_PROMPTS = 8


def prompts(tok: Tokenizer) -> list[list[int]]:
    base = tok.encode(
        " ".join(f"Line {i}: the tide came in slowly over the grey stones." for i in range(40)),
        add_special_tokens=False,
    )
    # ragged (48..76 tokens); session i takes prompt (i + 4) % 8, so 1 session runs the 64-token one
    return [
        base[4 * ((i + 4) % N_PROMPTS) : 4 * ((i + 4) % N_PROMPTS) + 48 + 4 * ((i + 4) % N_PROMPTS)]
        for i in range(N_PROMPTS)
    ]


def trajectories(model_dir: str, ids_list: list[list[int]], new: int, k: int) -> list[dict]:
    """Per prompt: the greedy continuation and, at k > 0, the f32 frames a device head would send."""
    whole, out = load_slice(model_dir), []
    head = load_slice(model_dir, 0, k, embed=True, head=False) if k else None
    for ids in ids_list:
        tokens = [t for t, _ in generate(model_step(whole), ids, new)]
        item = {"ids": ids, "tokens": tokens}
        if head is not None:
            with torch.inference_mode():
                hidden = head(torch.tensor([ids + tokens[:-1]]))[0]  # [T + new - 1, d]
            item["prefill"] = codec.encode(hidden[: len(ids)], "f32")
            item["steps"] = [codec.encode(hidden[i : i + 1], "f32") for i in range(len(ids), hidden.shape[0])]
        out.append(item)
    return out


def client(addr: str, fp: str, k: int, traj: dict, new: int, sid: str, out: dict) -> None:
    """One session; records arrival times of its tokens and whether they match the greedy path."""
    with grpc.insecure_channel(addr) as ch:
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        q: queue.Queue = queue.Queue()
        q.put(pb.DeviceMessage(open=pb.Open(session_id=sid, fingerprint=fp, split=k, codec="f32", max_new_tokens=new)))
        q.put(
            pb.DeviceMessage(prefill=pb.Prefill(token_ids=traj["ids"]) if k == 0 else pb.Prefill(frame=traj["prefill"]))
        )
        times, tokens = [], []
        t0 = time.perf_counter()
        for msg in stub.Generate(iter(q.get, None), timeout=600):
            kind = msg.WhichOneof("kind")
            if kind == "token":
                times.append(time.perf_counter())
                tokens.append(msg.token.id)
                if k and len(tokens) < new:
                    q.put(pb.DeviceMessage(step=pb.Step(frame=traj["steps"][len(tokens) - 1])))
            elif kind == "done":
                q.put(None)
        out[sid] = {"start": t0, "times": times, "exact": tokens == traj["tokens"][: len(tokens)]}


def edge_metrics(ops: str) -> dict[str, float]:
    text = httpx.get(ops + "/metrics", timeout=10).text
    return {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("coinfer_batch_size_")
    }


def run_load(edge, fp: str, k: int, trajs: list[dict], n: int, new: int) -> dict:
    before = edge_metrics(edge.ready["ops"])
    out: dict = {}
    threads = [
        threading.Thread(
            target=client,
            args=(edge.ready["grpc"], fp, k, trajs[i % len(trajs)], new, f"s{i}-{time.monotonic_ns()}", out),
        )
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = edge_metrics(edge.ready["ops"])
    gaps = sorted(b - a for r in out.values() for a, b in pairwise(r["times"]))
    steps = after.get("coinfer_batch_size_sum", 0) - before.get("coinfer_batch_size_sum", 0)
    batches = after.get("coinfer_batch_size_count", 0) - before.get("coinfer_batch_size_count", 0)
    return {
        "sessions": n,
        "tokens": sum(len(r["times"]) for r in out.values()),
        "wall_s": wall,
        "tokens_per_s": sum(len(r["times"]) for r in out.values()) / wall,
        "itl_p50_ms": 1000 * statistics.median(gaps),
        "itl_p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
        "mean_batch": steps / batches if batches else 0.0,
        "exact": all(r["exact"] for r in out.values()),
    }


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for (k, batching), style in zip(
        [(k, bt) for k in SPLITS for bt in (True, False)], ["-o", ":o", "-s", ":s"], strict=True
    ):
        rs = [r for r in rows if r["split"] == k and r["batching"] == batching]
        label = f"k={k} {'batched' if batching else 'one per forward'}"
        a.plot([r["sessions"] for r in rs], [r["tokens_per_s"] for r in rs], style, label=label)
        b.plot([r["sessions"] for r in rs], [r["itl_p99_ms"] for r in rs], style, label=label)
    a.set_ylabel("aggregate tokens/s")
    b.set_ylabel("p99 inter-token latency (ms)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(LOADS, [str(x) for x in LOADS])
        ax.set_xlabel("concurrent sessions")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M fp32 edge, {os.cpu_count()} CPUs (clients on the same host)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--splits", default=",".join(map(str, SPLITS)), help="fixed splits to measure, comma-separated")
    p.add_argument("--loads", default=",".join(map(str, LOADS)), help="concurrent sessions, comma-separated")
    p.add_argument("--edge-args", default="", help="extra edge-server flags for the batched edge (experiments)")
    p.add_argument("--no-baseline", action="store_true", help="skip the edge without batching")
    args = p.parse_args()
    splits, loads = [int(x) for x in split_list(args.splits)], [int(x) for x in split_list(args.loads)]

    tok, fp = Tokenizer(args.model), read_fingerprint(args.model)
    ids = prompts(tok)
    trajs = {k: trajectories(args.model, ids, args.new_tokens, k) for k in splits}
    common = ["--max-sessions", "64", "--workers", "96", "--prefix-reuse", "false"]
    modes = (True,) if args.no_baseline else (True, False)
    edges = {True: start_edge(args.model, args=common + ["--max-batch", "32", *args.edge_args.split()])}
    if not args.no_baseline:
        edges[False] = start_edge(args.model, args=common + ["--max-batch", "1"])
    rows = []
    try:
        for k in splits:
            for batching in modes:
                run_load(edges[batching], fp, k, trajs[k], 2, 8)  # warm-up
            for n in loads:
                for batching in modes:  # alternate: this host's speed drifts over minutes
                    r = {
                        "split": k,
                        "batching": batching,
                        **run_load(edges[batching], fp, k, trajs[k], n, args.new_tokens),
                    }
                    rows.append(r)
                    print(
                        f"  k={k} {'batched' if batching else 'single '} {n:>2} sessions: "
                        f"{r['tokens_per_s']:.1f} tok/s, mean batch {r['mean_batch']:.1f}",
                        flush=True,
                    )
    finally:
        for e in edges.values():
            e.stop()

    print(
        f"\nSmolLM2-135M-Instruct fp32 edge, {os.cpu_count()} CPUs shared with the clients, loopback gRPC; "
        f"{args.new_tokens} greedy tokens per session"
    )
    print(
        f"{'k':>3}{'edge':>17}{'sessions':>9}{'tok/s':>8}{'vs 1':>7}{'ITL p50 ms':>11}{'ITL p99 ms':>11}"
        f"{'batch':>7}{'exact':>7}"
    )
    for r in rows:
        single = next(
            (x for x in rows if x["split"] == r["split"] and x["batching"] == r["batching"] and x["sessions"] == 1), r
        )
        r["vs_single"] = r["tokens_per_s"] / single["tokens_per_s"]
        print(
            f"{r['split']:>3}{'batched' if r['batching'] else 'one per forward':>17}{r['sessions']:>9}"
            f"{r['tokens_per_s']:>8.1f}{r['vs_single']:>6.1f}x{r['itl_p50_ms']:>11.1f}{r['itl_p99_ms']:>11.1f}"
            f"{r['mean_batch']:>7.1f}{'yes' if r['exact'] else 'NO':>7}"
        )
    if args.edge_args or args.no_baseline or set(loads) != set(LOADS) or set(splits) != set(SPLITS):
        return  # an experiment: the committed results stay as they are
    targets = {
        k: next(r["vs_single"] for r in rows if r["split"] == k and r["batching"] and r["sessions"] == 16)
        for k in SPLITS
    }
    for k, v in targets.items():
        print(
            f"target k={k}: 16 sessions >= 4x single-session aggregate -> {v:.1f}x ({'met' if v >= 4 else 'NOT met'})"
        )

    result = {
        "benchmark": "edge_concurrency",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "rows": rows,
        "target_16_vs_1": {str(k): v for k, v in targets.items()},
    }
    write_results(RESULTS / "edge_concurrency.json", result, lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
