"""Soak: many sessions with random cancellations and client disconnects; does the edge leak?

Real `edge-server` and `device-agent` processes on 127.0.0.1. `--sessions` requests (default
200) from `--concurrency` client threads through the agent's REST API, each one at random:
completed normally (streamed or not), streamed and hung up after a few chunks, or cut by a
client timeout; plus raw gRPC sessions to the edge that open, prefill and vanish. Splits
vary (0, 8, 15, 29, auto). Afterwards: the edge's live sessions and their KV bytes (must be 0;
kept prefix caches are reported apart), and the edge's RSS against its level after the
warm-up (target within 10%). The edge runs without prefix reuse unless `--prefix-reuse`: kept
caches hold KV bytes by design (up to the budget), which would hide a leak in the RSS.
Prints a table, writes benchmarks/results/soak.json and .png.

    python benchmarks/soak.py [--model models/smollm2-135m-instruct] [--sessions 200]
"""

from __future__ import annotations

import os
import platform
import random
import threading
import time
from pathlib import Path

import grpc
import httpx
from _common import RESULTS, parser, pyplot, write_results

from coinfer.model.weights import read_fingerprint
from coinfer.tools.launcher import start_agent, start_edge
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc

WORDS = "harbour tide lantern river meadow engine letter window garden thunder bakery station".split()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_request(base: str, model: str, rng: random.Random) -> str:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": rng.randint(4, 32),
        "temperature": rng.choice([0, 0.8]),
        "split": rng.choice([0, 8, 15, 29, "auto"]),
    }
    action = rng.choice(["complete", "complete", "stream", "hang_up", "timeout"])
    try:
        if action == "complete":
            httpx.post(base + "/v1/chat/completions", json=body, timeout=120).raise_for_status()
        elif action in ("stream", "hang_up"):
            with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
                for i, _ in enumerate(s.iter_lines()):
                    if action == "hang_up" and i >= rng.randint(1, 6):
                        break  # the client goes away mid-stream
        else:
            httpx.post(base + "/v1/chat/completions", json=body, timeout=rng.uniform(0.05, 0.4))
    except httpx.TimeoutException:
        pass
    return action


def vanishing_grpc(addr: str, fp: str, rng: random.Random) -> str:
    """Open, prefill, read a token or two, then cancel: a device that dies mid-session."""
    with grpc.insecure_channel(addr) as ch:
        msgs = [
            pb.DeviceMessage(
                open=pb.Open(session_id=f"soak-{rng.random()}", fingerprint=fp, split=0, max_new_tokens=64)
            ),
            pb.DeviceMessage(prefill=pb.Prefill(token_ids=[rng.randrange(100, 5000) for _ in range(20)])),
        ]
        call = edge_pb2_grpc.EdgeInferenceStub(ch).Generate(iter(msgs), timeout=30)
        try:
            for i, _ in enumerate(call):
                if i >= rng.randint(1, 3):
                    break
        except grpc.RpcError:
            pass
        call.cancel()
    return "grpc_vanish"


def plot(samples: list[tuple[float, float, int]], warm: float, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s[0] for s in samples], [s[1] for s in samples], label="edge RSS (MiB)")
    ax.axhline(warm * 1.1, color="k", ls="--", lw=0.8, label="warm-up level + 10%")
    ax2 = ax.twinx()
    ax2.plot([s[0] for s in samples], [s[2] for s in samples], color="tab:orange", alpha=0.6, label="sessions done")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax2.set_ylabel("sessions done")
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Soak: edge memory over sessions with cancellations and disconnects")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def drive(args, edge, agent) -> tuple[dict, list, float]:
    """Run the sessions; (client actions, RSS samples (t, MiB, done), RSS after the warm-up)."""
    fp, pid = read_fingerprint(args.model), edge.proc.pid
    done, actions, samples, lock, warm = [0], {}, [], threading.Lock(), [0.0]
    base, t0 = agent.ready["http"], time.monotonic()
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    todo = list(range(args.sessions))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            a = vanishing_grpc(edge.ready["grpc"], fp, rng) if rng.random() < 0.15 else one_request(base, model, rng)
            with lock:
                actions[a] = actions.get(a, 0) + 1
                done[0] += 1
                if done[0] == args.warmup:
                    warm[0] = rss_mib(pid)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic() - t0, rss_mib(pid), done[0]))
        time.sleep(0.5)
    deadline = time.monotonic() + 30  # let hung-up sessions notice and end
    while httpx.get(edge.ready["ops"] + "/v1/sessions").json()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    samples.append((time.monotonic() - t0, rss_mib(pid), done[0]))
    return actions, samples, warm[0]


def after_state(edge) -> dict:
    """What the edge holds once every client is gone."""
    sessions = httpx.get(edge.ready["ops"] + "/v1/sessions").json()["sessions"]
    info = httpx.get(edge.ready["ops"] + "/v1/info").json()["load"]
    metrics = httpx.get(edge.ready["ops"] + "/metrics").text
    return {
        "live_sessions_after": len(sessions),
        "live_kv_bytes_after": sum(s["kv_cache_bytes"] for s in sessions),
        "kept_caches_after": int(info.get("kept_caches", 0)),
        "kv_bytes_after": int(info.get("kv_cache_bytes", 0)),
        "edge_outcomes": {
            line.split('"')[1]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("coinfer_sessions_total{")
        },
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--warmup", type=int, default=20, help="sessions before the RSS baseline is taken")
    p.add_argument(
        "--prefix-reuse",
        action="store_true",
        help="let the edge keep finished caches (by design they then hold KV bytes, up to the budget)",
    )
    args = p.parse_args()

    # one torch thread each: both processes compute at once on this host's cores, and two OpenMP
    # teams of 2 on 2 cores stall at every barrier (README, edge concurrency): ~3 tokens/s in all
    edge = start_edge(
        args.model,
        args=[
            "--max-sessions",
            "32",
            "--torch-threads",
            "1",
            "--prefix-reuse",
            "true" if args.prefix_reuse else "false",
        ],
    )
    try:
        agent = start_agent(args.model, edge.ready["grpc"], args=["--busy-wait-seconds", "30", "--torch-threads", "1"])
        try:
            actions, samples, warm = drive(args, edge, agent)
            state = after_state(edge)
        finally:
            agent.stop()
    finally:
        edge.stop()
    final = samples[-1][1]
    growth = final / warm - 1
    result = {
        "benchmark": "soak",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "sessions": args.sessions,
        "concurrency": args.concurrency,
        "prefix_reuse": args.prefix_reuse,
        "actions": actions,
        **state,
        "rss_warm_mib": warm,
        "rss_final_mib": final,
        "rss_peak_mib": max(s[1] for s in samples),
        "rss_growth": growth,
        "seconds": samples[-1][0],
    }
    print(
        f"\nsoak: {args.sessions} sessions, {args.concurrency} clients, {result['seconds']:.0f} s on "
        f"{os.cpu_count()} CPUs; client actions {actions}; edge session outcomes {state['edge_outcomes']}"
    )
    print(
        f"after: live sessions {state['live_sessions_after']}, their KV bytes {state['live_kv_bytes_after']}; "
        f"kept prefix caches {state['kept_caches_after']} ({state['kv_bytes_after']} B, within the budget)"
    )
    print(
        f"edge RSS: {warm:.0f} MiB after {args.warmup} sessions, peak {result['rss_peak_mib']:.0f}, "
        f"final {final:.0f} MiB ({growth:+.1%}); target within 10% -> {'met' if abs(growth) <= 0.10 else 'NOT met'}"
    )
    write_results(RESULTS / "soak.json", result, lambda png: plot(samples, warm, png))


if __name__ == "__main__":
    main()
