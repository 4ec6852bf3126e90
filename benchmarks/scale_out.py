"""Edge tier scale-out behind nginx (deploy/nginx/nginx.conf) on loopback: 1, 2, 3 replicas.

Real edge-server processes behind a real nginx (consistent hash on x-session-id), real gRPC
clients (threads of this process). Half the sessions run at k = 0 (token ids; the edge
generates on its own), half at k = 15 (the clients replay f32 frames a real device head
computed along the greedy path, so they cost the CPU almost nothing). All sessions start
together. Per replica count: aggregate tokens/s, p50/p99 inter-token latency, sessions per
replica (from each replica's /metrics). Then, with 3 replicas, one replica is killed (SIGKILL)
mid-run: a client whose stream breaks replays its history on a new stream with the same
session id (as the device agent does); replays per kill and whether every session's tokens
still equal the greedy path. A capacity model (sessions per replica from the KV budget and
from measured decode throughput) closes the report. Prints tables, writes
benchmarks/results/scale_out.json and .png.

    python benchmarks/scale_out.py [--model models/smollm2-135m-instruct] [--sessions 24] [--new-tokens 64]
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

from coinfer import codec, wire
from coinfer.model import load_slice
from coinfer.model.config import ModelConfig
from coinfer.model.generation import generate, model_step
from coinfer.model.tokenizer import Tokenizer
from coinfer.model.weights import read_fingerprint
from coinfer.tools.launcher import start_edge
from coinfer.tools.proxies import Proxy
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc

REPLICAS = (1, 2, 3)
K = 15


def trajectories(model_dir: str, tok: Tokenizer, n: int, new: int) -> list[dict]:
    """n greedy sessions (prompts of 40..68 tokens); odd ones at split K with the head's hidden states."""
    base = tok.encode(
        " ".join(f"Entry {i}: the harbor lights blink across the quiet water." for i in range(30)),
        add_special_tokens=False,
    )
    whole, head = load_slice(model_dir), load_slice(model_dir, 0, K, embed=True, head=False)
    out = []
    for i in range(n):
        ids = base[3 * (i % 8) : 3 * (i % 8) + 40 + 4 * (i % 8)]
        tokens = [t for t, _ in generate(model_step(whole), ids, new)]
        item = {"ids": ids, "tokens": tokens, "split": 0 if i % 2 == 0 else K}
        if item["split"]:
            with torch.inference_mode():
                item["hidden"] = head(torch.tensor([ids + tokens[:-1]]))[0]  # [T + new - 1, d]
        out.append(item)
    return out


def _stream(stub, fp: str, sid: str, traj: dict, done: list[int], new: int):
    """One Generate stream from the session's current position (a replay when done is not empty)."""
    k, history = traj["split"], traj["ids"] + done
    q: queue.Queue = queue.Queue()
    q.put(
        pb.DeviceMessage(
            open=pb.Open(session_id=sid, fingerprint=fp, split=k, codec="f32", max_new_tokens=new - len(done))
        )
    )
    q.put(
        pb.DeviceMessage(
            prefill=pb.Prefill(token_ids=history)
            if k == 0
            else pb.Prefill(frame=codec.encode(traj["hidden"][: len(history)], "f32"))
        )
    )
    if k == 0:
        q.put(None)
    call = stub.Generate(iter(q.get, None), timeout=600, metadata=wire.affinity_metadata(sid))
    return q, call


def client(addr: str, fp: str, traj: dict, new: int, sid: str, out: dict) -> None:
    """One session; on a broken stream it replays its history (same session id) up to 3 times."""
    times, tokens, replays = [], [], 0
    with grpc.insecure_channel(addr) as ch:
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        while len(tokens) < new:
            q, call = _stream(stub, fp, sid, traj, tokens, new)
            try:
                for msg in call:
                    if msg.WhichOneof("kind") != "token":
                        continue
                    times.append(time.perf_counter())
                    tokens.append(msg.token.id)
                    if traj["split"] and len(tokens) < new:
                        step = traj["hidden"][len(traj["ids"]) + len(tokens) - 1 :][:1]
                        q.put(pb.DeviceMessage(step=pb.Step(frame=codec.encode(step, "f32"))))
                    elif traj["split"]:
                        q.put(None)
            except grpc.RpcError:
                replays += 1
                if replays > 3:
                    raise
                time.sleep(0.2)
    out[sid] = {"times": times, "exact": tokens == traj["tokens"], "replays": replays}


def opened(ops: str) -> float:
    text = httpx.get(ops + "/metrics", timeout=10).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("coinfer_sessions_opened_total")
    )


def run(addr: str, edges: list, fp: str, trajs: list[dict], new: int, kill_after: float | None = None) -> dict:
    out: dict = {}
    before = [opened(e.ready["ops"]) for e in edges]
    tag = time.monotonic_ns()
    threads = [
        threading.Thread(target=client, args=(addr, fp, t, new, f"s{i}-{tag}", out)) for i, t in enumerate(trajs)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    killed = None
    if kill_after is not None:
        time.sleep(kill_after)
        live = [len(httpx.get(e.ready["ops"] + "/v1/sessions", timeout=10).json()["sessions"]) for e in edges]
        killed = max(range(len(edges)), key=lambda j: live[j])
        killed_live = live[killed]
        edges[killed].kill()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    per_replica = [opened(e.ready["ops"]) - b for e, b in zip(edges, before, strict=True) if e.proc.poll() is None]
    gaps = sorted(b - a for r in out.values() for a, b in pairwise(r["times"]))
    tokens = sum(len(r["times"]) for r in out.values())
    row = {
        "replicas": len(edges),
        "sessions": len(trajs),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "itl_p50_ms": 1000 * statistics.median(gaps),
        "itl_p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
        "sessions_per_replica": per_replica,
        "exact": len(out) == len(trajs) and all(r["exact"] for r in out.values()),
        "replays": sum(r["replays"] for r in out.values()),
    }
    if killed is not None:
        row.update(killed_replica=killed, live_on_killed=killed_live)
    return row


def capacity(model_dir: str, budget: int, context: int, per_replica_tok_s: float, session_tok_s: float) -> dict:
    """Sessions one replica holds: by its KV budget (at split 0, the worst case) and by decode throughput."""
    cfg = ModelConfig.from_dir(model_dir)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # k and v, f32, all layers
    return {
        "kv_bytes_per_token": kv_per_token,
        "context_tokens": context,
        "kv_budget_bytes": budget,
        "sessions_by_kv": budget // (kv_per_token * context),
        "replica_tokens_per_s": per_replica_tok_s,
        "session_tokens_per_s": session_tok_s,
        "sessions_by_compute": int(per_replica_tok_s // session_tok_s),
    }


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar([str(r["replicas"]) for r in rows], [r["tokens_per_s"] for r in rows])
    b.bar([str(r["replicas"]) for r in rows], [r["itl_p99_ms"] for r in rows], color="tab:orange")
    a.set_ylabel("aggregate tokens/s")
    b.set_ylabel("p99 inter-token latency (ms)")
    for ax in (a, b):
        ax.set_xlabel("edge replicas behind nginx")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"SmolLM2-135M fp32, {rows[0]['sessions']} sessions (k 0 and {K}), {os.cpu_count()} CPUs "
        "shared by every replica and the clients"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=1, help="per replica (2 cores shared by all replicas)")
    args = p.parse_args()
    tok, fp = Tokenizer(args.model), read_fingerprint(args.model)
    trajs = trajectories(args.model, tok, args.sessions, args.new_tokens)
    edge_args = ["--torch-threads", str(args.torch_threads), "--max-sessions", "64", "--workers", "96"]
    edges = [start_edge(args.model, args=edge_args) for _ in range(max(REPLICAS))]
    rows, proxy = [], None
    try:
        for n in REPLICAS:
            proxy = Proxy("nginx", [(e.ready["grpc"], e.ready["ops"]) for e in edges[:n]])
            run(proxy.address, edges[:n], fp, trajs[:2], 8)  # warm-up
            rows.append(run(proxy.address, edges[:n], fp, trajs, args.new_tokens))
            proxy.stop()
            r = rows[-1]
            print(
                f"  {n} replicas: {r['tokens_per_s']:.1f} tok/s, p99 ITL {r['itl_p99_ms']:.0f} ms, "
                f"sessions per replica {r['sessions_per_replica']}",
                flush=True,
            )
        proxy = Proxy("nginx", [(e.ready["grpc"], e.ready["ops"]) for e in edges])
        first = rows[-1]["wall_s"]
        kill = run(proxy.address, edges, fp, trajs, args.new_tokens, kill_after=first / 3)
    finally:
        if proxy is not None:
            proxy.stop()
        for e in edges:
            e.stop()

    print(
        f"\nSmolLM2-135M-Instruct fp32 edges behind nginx on loopback, {os.cpu_count()} CPUs shared by every "
        f"replica and the clients; {args.sessions} sessions (k 0 and {K}), {args.new_tokens} greedy tokens each"
    )
    print(
        f"{'replicas':>9}{'tok/s':>8}{'vs 1':>7}{'ITL p50 ms':>11}{'ITL p99 ms':>11}"
        f"  {'sessions per replica':<22}{'exact':>6}"
    )
    for r in rows:
        r["vs_one"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(
            f"{r['replicas']:>9}{r['tokens_per_s']:>8.1f}{r['vs_one']:>6.2f}x{r['itl_p50_ms']:>11.1f}"
            f"{r['itl_p99_ms']:>11.1f}  {str([int(x) for x in r['sessions_per_replica']]):<22}"
            f"{'yes' if r['exact'] else 'NO':>6}"
        )
    print(
        f"\nkill -9 of 1 of 3 replicas at 1/3 of the run: {kill['live_on_killed']} sessions were live on it, "
        f"{kill['replays']} replays, {kill['tokens_per_s']:.1f} tok/s, p99 ITL {kill['itl_p99_ms']:.0f} ms, "
        f"all tokens equal the greedy path: {'yes' if kill['exact'] else 'NO'}"
    )
    session_rate = 1000 / rows[0]["itl_p50_ms"]
    cap = capacity(args.model, 1 << 30, 2048, rows[0]["tokens_per_s"], 10.0)
    print(
        f"\ncapacity of one replica (this host): KV {cap['kv_bytes_per_token']} B/token at k=0 -> "
        f"{cap['sessions_by_kv']} sessions of {cap['context_tokens']} tokens in a 1 GiB budget; decode "
        f"{cap['replica_tokens_per_s']:.0f} tok/s -> {cap['sessions_by_compute']} sessions at 10 tok/s each "
        f"(p50 pace here: {session_rate:.1f} tok/s per session)"
    )

    result = {
        "benchmark": "scale_out",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "model": Path(args.model).name,
        "sessions": args.sessions,
        "new_tokens": args.new_tokens,
        "torch_threads_per_replica": args.torch_threads,
        "split_mix": [0, K],
        "rows": rows,
        "kill": kill,
        "capacity": cap,
        "command": f"python benchmarks/scale_out.py --sessions {args.sessions} --new-tokens {args.new_tokens}",
    }
    write_results(RESULTS / "scale_out.json", result, lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
