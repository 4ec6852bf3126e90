"""Does the partitioner choose well? Its choice vs an exhaustive sweep of cuts, on shaped links.

Real processes: one edge-server (1 torch thread), one device-agent per (device slow-down,
scenario) (1 torch thread), the link between them through our shaper (coinfer/tools/shaper.py:
rate each way + one-way delay = RTT / 2). Grid: uplink 256 kbit/s, 2, 20 Mbit/s x RTT 5,
50 ms x device slow-down 1x, 4x (BENCHMARK EMULATION, benchmarks/emulated_device.py: the agent
sleeps (f-1) x each forward's time) x {no floor, idle edge; privacy floor 2, edge busy with 8 background
sessions}. In each cell: a 128-token prompt + 32 new tokens (greedy, ignore_eos), end-to-end
latency measured at the REST client for every cut in the sweep set (0, the floor, N and
interior points), then once with split "auto" (the planner's choice, from the estimates the
sweep just taught it). regret = chosen / best - 1, best over everything measured in the cell.
The latency of a cut is the best of its runs in the cell, sweep and auto runs pooled (when the
planner picks the oracle's cut, its regret is 0, not the noise between two runs of one config).
A sweep run slower than 1.5x the best so far is stopped there and recorded as censored
(">= t"): it cannot be the best, and the busy cells would otherwise take an hour. Run-to-run
noise on this shared 2-core host is ~5-10%, so the sweep's best cut and the planner's choice
are both measured twice and their faster run kept.
Then the link drops from 20 Mbit/s to 256 kbit/s between auto requests: how many requests
until the plan changes. Prints a table, writes benchmarks/results/partition_oracle.json/.png.

    python benchmarks/partition_oracle.py [--model models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from _common import RESULTS, parser, pyplot, write_results

from coinfer.model.prepare import DEFAULT_MODEL_DIR
from coinfer.model.texts import HELDOUT_PROSE
from coinfer.model.tokenizer import Tokenizer
from coinfer.tools.launcher import start_agent, start_edge
from coinfer.tools.shaper import Shaper

N = 30
PROMPT, NEW = 128, 32
LINKS = [(256e3, 0.005), (256e3, 0.05), (2e6, 0.005), (2e6, 0.05), (20e6, 0.005), (20e6, 0.05)]
SCENARIOS = {"open": dict(floor=0, busy=0), "floor2_busy8": dict(floor=2, busy=8)}
CENSOR = 1.5
EMULATED_DEVICE = Path(__file__).with_name("emulated_device.py")  # the agent, its head slowed down


def sweep_cuts(floor: int) -> list[int]:
    """Device-only first (needs no edge: a fast bound to censor the rest against), then the edge end."""
    interior = [1, 2, 4, 8, 15, 22, 29] if floor == 0 else [3, 4, 8, 15, 22, 29]
    first = [N, 0] if floor == 0 else [N, floor]
    return first + [k for k in interior if k not in first]


def run(api: httpx.Client, model: str, ids: list[int], split, limit: float | None) -> dict:
    """One streamed completion; stops reading after `limit` seconds (censored)."""
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": NEW,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "split": split,
    }
    t0 = time.perf_counter()
    last: dict = {}
    with api.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"split {split}: HTTP {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if limit is not None and time.perf_counter() - t0 > limit:
                return {"split": split, "seconds": time.perf_counter() - t0, "censored": True}
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "coinfer" in chunk:
                    last = chunk["coinfer"]
    return {
        "split": last.get("split", split),
        "seconds": time.perf_counter() - t0,
        "censored": False,
        "reason": last.get("split_reason", ""),
        "predicted": last.get("predicted", {}).get("total_seconds"),
    }


def cell(api: httpx.Client, model: str, ids: list[int], floor: int) -> dict:
    runs, best = [], None
    for k in sweep_cuts(floor):
        r = run(api, model, ids, k, None if best is None else CENSOR * best)
        runs.append(r)
        if not r["censored"]:
            best = r["seconds"] if best is None else min(best, r["seconds"])
    best_run = min((r for r in runs if not r["censored"]), key=lambda r: r["seconds"])
    again = run(api, model, ids, best_run["split"], None)  # best of 2 for the oracle's pick ...
    best_run["seconds"] = min(best_run["seconds"], again["seconds"])
    plan = api.get("/v1/plan", params={"prompt_tokens": PROMPT, "max_tokens": NEW}).json()
    chosen = run(api, model, ids, "auto", None)
    second = run(api, model, ids, "auto", None)  # ... and for the planner's (when it picks the same again)
    auto_runs = [{"split": r["split"], "seconds": r["seconds"]} for r in (chosen, second)]
    if second["split"] == chosen["split"]:
        chosen["seconds"] = min(chosen["seconds"], second["seconds"])
    return score(
        {
            "sweep": runs,
            "chosen": chosen,
            "auto_runs": auto_runs,
            "predicted_per_split": {c["split"]: c["total_seconds"] for c in plan["per_split"]},
            "link_estimate": plan["link"],
            "edge_load": plan["edge"],
            "plan_reason": plan["reason"],
        }
    )


def score(c: dict) -> dict:
    """Pooled latency per cut, the oracle's best, and the regret of the planner's choice."""
    lat: dict[int, float] = {}
    for r in c["sweep"]:
        if not r["censored"]:
            lat[r["split"]] = min(lat.get(r["split"], float("inf")), r["seconds"])
    k = c["chosen"]["split"]
    lat[k] = min(lat.get(k, float("inf")), c["chosen"]["seconds"])
    best_k = min(lat, key=lat.get)
    sweep_best = min(r["seconds"] for r in c["sweep"] if not r["censored"])
    auto = c["chosen"]["seconds"]
    c.update(
        latency_per_split=lat,
        best_split=best_k,
        best_seconds=lat[best_k],
        chosen_seconds=lat[k],
        regret=lat[k] / lat[best_k] - 1,
        # the auto runs alone against the sweep alone: includes run-to-run noise of one config
        regret_unpooled=auto / min(sweep_best, auto) - 1,
    )
    return c


def background(edge: str, sessions: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--background", str(sessions), "--edge", edge],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def background_main(edge: str, sessions: int) -> None:
    """Other devices: `sessions` k = 0 sessions generating back to back on the edge (not shaped)."""
    import grpc

    from coinfer.v1 import edge_pb2 as pb
    from coinfer.v1 import edge_pb2_grpc

    channel = grpc.insecure_channel(edge)
    stub = edge_pb2_grpc.EdgeInferenceStub(channel)
    fp = stub.Describe(pb.DescribeRequest(), wait_for_ready=True, timeout=60).fingerprint

    def loop(i: int) -> None:
        while True:
            msgs = [
                pb.DeviceMessage(
                    open=pb.Open(
                        session_id=f"bg-{i}-{time.monotonic_ns()}", fingerprint=fp, split=0, max_new_tokens=256
                    )
                ),
                pb.DeviceMessage(prefill=pb.Prefill(token_ids=list(range(100, 164)))),
            ]
            try:
                for _ in stub.Generate(iter(msgs)):
                    pass
            except grpc.RpcError:
                time.sleep(0.5)

    for i in range(sessions):
        threading.Thread(target=loop, args=(i,), daemon=True).start()
    threading.Event().wait()


def link_drop(api: httpx.Client, model: str, ids: list[int], shaper: Shaper) -> dict:
    shaper.set(rate_bits=20e6, delay=0.0025)
    before = [run(api, model, ids, "auto", None) for _ in range(3)]
    shaper.set(rate_bits=256e3, delay=0.0025)
    after = [run(api, model, ids, "auto", None) for _ in range(5)]
    pre = before[-1]["split"]
    changed = next((i + 1 for i, r in enumerate(after) if r["split"] != pre), None)
    return {
        "scenario": "device x4, floor 2, idle edge, RTT 5 ms: 20 Mbit/s -> 256 kbit/s",
        "splits_before": [r["split"] for r in before],
        "splits_after": [r["split"] for r in after],
        "seconds_after": [r["seconds"] for r in after],
        "requests_until_change": changed,
    }


def agent_for(model_dir: str, shaper: Shaper, slowdown: float, floor: int):
    return start_agent(
        model_dir,
        f"127.0.0.1:{shaper.port}",
        program=[sys.executable, str(EMULATED_DEVICE), "--slowdown", str(slowdown)],
        args=[
            "--torch-threads",
            "1",
            "--min-device-layers",
            str(floor),
            "--describe-interval-seconds",
            "1",
            "--request-timeout-seconds",
            "600",
        ],
    )


def grid(args, edge_addr: str, shaper: Shaper, ids: list[int]) -> tuple[list[dict], dict]:
    cells, drop = [], {}
    slowdowns, links = ((4.0,), LINKS[3:4]) if args.quick else ((1.0, 4.0), LINKS)
    for slowdown in slowdowns:
        for name, sc in SCENARIOS.items():
            agent = agent_for(args.model, shaper, slowdown, sc["floor"])
            bg = background(edge_addr, sc["busy"]) if sc["busy"] else None
            try:
                with httpx.Client(base_url=agent.ready["http"], timeout=900) as api:
                    model = api.get("/v1/models").json()["data"][0]["id"]
                    if bg:
                        time.sleep(4)  # background sessions running, their queue visible in Describe
                    for rate, rtt in links:
                        shaper.set(rate_bits=rate, delay=rtt / 2)
                        c = cell(api, model, ids, sc["floor"])
                        c.update(
                            rate_bits=rate,
                            rtt=rtt,
                            slowdown=slowdown,
                            scenario=name,
                            floor=sc["floor"],
                            busy=sc["busy"],
                        )
                        cells.append(c)
                        print(row(c), flush=True)
            finally:
                if bg:
                    bg.kill()
                    bg.wait()
                agent.stop()
    agent = agent_for(args.model, shaper, 4.0, 2)
    try:
        with httpx.Client(base_url=agent.ready["http"], timeout=900) as api:
            drop = link_drop(api, api.get("/v1/models").json()["data"][0]["id"], ids, shaper)
    finally:
        agent.stop()
    return cells, drop


def label(c: dict) -> str:
    rate = f"{c['rate_bits'] / 1e6:g}M" if c["rate_bits"] >= 1e6 else f"{c['rate_bits'] / 1e3:g}k"
    return f"{rate} {c['rtt'] * 1e3:g}ms x{c['slowdown']:g} {c['scenario']}"


def row(c: dict) -> str:
    return (
        f"{label(c):<30} best k={c['best_split']:>2} {c['best_seconds']:6.2f}s  chosen k={c['chosen']['split']:>2} "
        f"{c['chosen_seconds']:6.2f}s  regret {c['regret'] * 100:5.1f}%"
    )


def plot(cells: list[dict], path: Path) -> None:
    plt = pyplot()
    cols = 6
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, c in zip(axes.flat, cells, strict=False):
        done = [r for r in c["sweep"] if not r["censored"]]
        cens = [r for r in c["sweep"] if r["censored"]]
        ax.plot(
            sorted(r["split"] for r in done),
            [r["seconds"] for r in sorted(done, key=lambda r: r["split"])],
            "o-",
            ms=3,
            label="measured",
        )
        if cens:
            ax.plot([r["split"] for r in cens], [r["seconds"] for r in cens], "^", mfc="none", ms=5, label="stopped at")
        pred = sorted((int(k), v) for k, v in c["predicted_per_split"].items())
        ax.plot([k for k, _ in pred], [v for _, v in pred], "--", lw=0.8, color="gray", label="predicted")
        ax.plot([c["chosen"]["split"]], [c["chosen_seconds"]], "r*", ms=10, label="chosen")
        ax.set_title(f"{label(c)}\nregret {c['regret'] * 100:.1f}%", fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(cells) :]:
        ax.axis("off")
    fig.supxlabel("split k (layers on the device)")
    fig.supylabel("seconds: 128-token prompt + 32 new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = parser(__doc__, os.environ.get("COINFER_MODEL_DIR", DEFAULT_MODEL_DIR))
    ap.add_argument("--quick", action="store_true", help="one link, device x4 only (a smoke run)")
    ap.add_argument("--rescore", default="", help="recompute regrets, table and PNG of a saved JSON run")
    ap.add_argument("--background", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--edge", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.background:
        return background_main(args.edge, args.background)
    if args.rescore:
        saved = json.loads(Path(args.rescore).read_text())
        cells = [score(c) for c in saved["cells"]]
        for c in cells:
            print(row(c))
        saved["summary"].update(summarize(cells))
        return write(saved, cells, Path(args.rescore).stem)
    ids = Tokenizer(args.model).encode(HELDOUT_PROSE, add_special_tokens=False)[:PROMPT]
    edge = start_edge(args.model, args=["--torch-threads", "1", "--max-sessions", "64"])
    host, port = edge.ready["grpc"].rsplit(":", 1)
    shaper = Shaper((host, int(port)))
    shaper.start()
    t0 = time.time()
    try:
        cells, drop = grid(args, edge.ready["grpc"], shaper, ids)
    finally:
        shaper.stop()
        edge.stop()
    summary = {**summarize(cells), "link_drop": drop, "wall_seconds": time.time() - t0}
    result = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "censor_factor": CENSOR,
        "summary": summary,
        "cells": cells,
    }
    write(result, cells, "partition_oracle_quick" if args.quick else "partition_oracle")


def summarize(cells: list[dict]) -> dict:
    regrets, raw = [c["regret"] for c in cells], [c["regret_unpooled"] for c in cells]
    return {
        "cells": len(cells),
        "median_regret": statistics.median(regrets),
        "worst_regret": max(regrets),
        "median_regret_unpooled": statistics.median(raw),
        "worst_regret_unpooled": max(raw),
        "chose_the_oracle_cut": sum(c["chosen"]["split"] == c["best_split"] for c in cells),
    }


def write(result: dict, cells: list[dict], name: str) -> None:
    s, drop = result["summary"], result["summary"]["link_drop"]
    print(
        f"\nmedian regret {s['median_regret'] * 100:.1f}%, worst {s['worst_regret'] * 100:.1f}% (unpooled: "
        f"{s['median_regret_unpooled'] * 100:.1f}%, {s['worst_regret_unpooled'] * 100:.1f}%) over {len(cells)} cells "
        f"(oracle's cut chosen in {s['chose_the_oracle_cut']}); link drop: splits "
        f"{drop['splits_before']} -> {drop['splits_after']}, changed after {drop['requests_until_change']} request(s)"
    )
    write_results(RESULTS / f"{name}.json", result, lambda png: plot(cells, png), indent=1)


if __name__ == "__main__":
    main()
