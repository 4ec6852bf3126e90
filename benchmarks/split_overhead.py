"""What splitting costs: monolithic vs device agent + edge server over loopback gRPC.

Real processes (edge-server, device-agent) on 127.0.0.1, requests through the REST API.
For each (split k, codec): greedy decode tokens/s over 128 new tokens, time to first token
for a 128-token prompt, uplink bytes of the prompt's Prefill and per decode Step, downlink
bytes per token (serialized gRPC messages, from the response's `coinfer` object).
Baselines: the whole model in this process (no serving stack), and k = N through the device
agent (serving stack, no edge). Configurations run round-robin, `--repeats` rounds, best
kept: this host's speed drifts by tens of percent over minutes, and round-robin spreads the
drift over all configurations instead of favouring whichever ran first.
Prints a table, writes benchmarks/results/split_overhead.json and .png.

    python benchmarks/split_overhead.py [--model models/smollm2-135m-instruct] [--repeats 3]
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import httpx
import torch
from _common import RESULTS, parser, pyplot, write_results

from coinfer import wire
from coinfer.model import ModelConfig, load_slice
from coinfer.model.generation import generate, model_step
from coinfer.model.tokenizer import Tokenizer
from coinfer.tools.launcher import start_agent, start_edge

CONFIGS = [
    (30, wire.NO_EDGE),
    (0, wire.TOKEN_IDS),
    (1, "f16"),
    (15, "f32"),
    (15, "f16"),
    (15, "int8"),
    (15, "int4"),
    (29, "f16"),
]


def prompt_ids(tok: Tokenizer, n: int) -> list[int]:
    text = " ".join(f"Note {i}: the tide came in slowly over the grey stones of the harbour." for i in range(n))
    return tok.encode(text, add_special_tokens=False)[:n]


def in_process(model, ids: list[int], new: int) -> dict:
    t0 = time.perf_counter()
    ttft = None
    for i, _tok in enumerate(generate(model_step(model), ids, new)):
        if i == 0:
            ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"ttft_s": ttft, "decode_tokens_per_s": (new - 1) / (total - ttft)}


def served(client: httpx.Client, model: str, ids: list[int], new: int, k: int, codec: str) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": new, "temperature": 0, "ignore_eos": True, "split": k}
    if codec not in wire.PSEUDO_CODECS:
        body["codec"] = codec
    r = client.post("/v1/completions", json=body)
    r.raise_for_status()
    ext, n = r.json()["coinfer"], r.json()["usage"]["completion_tokens"]
    t = ext["timings"]
    return {
        "ttft_s": t["ttft_seconds"],
        "decode_tokens_per_s": (n - 1) / (t["total_seconds"] - t["ttft_seconds"]),
        "prefill_up_bytes": ext["prefill_bytes_up"],
        "step_up_bytes": ext["step_bytes_up"] / max(1, n - 1),
        "down_bytes_per_token": ext["bytes_down"] / n,
        "device_s": t["device_compute_seconds"],
        "edge_s": t["edge_compute_seconds"],
        "network_s": t["network_seconds"],
    }


def best_of(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["decode_tokens_per_s"]) | {"ttft_s": min(r["ttft_s"] for r in runs)}


def measure_rounds(args, whole, ids: list[int], configs: dict[str, tuple[int, str]], mono: str) -> dict:
    """Start edge + agent, run every configuration once per round; round 0 (warm-up) is dropped later."""
    runs: dict[str, list[dict]] = {mono: [], **{n: [] for n in configs}}
    edge = start_edge(args.model)
    try:
        agent = start_agent(args.model, edge.ready["grpc"])
        try:
            with httpx.Client(base_url=agent.ready["http"], timeout=600) as client:
                model = client.get("/v1/models").json()["data"][0]["id"]
                for rnd in range(args.repeats + 1):
                    runs[mono].append(in_process(whole, ids, args.new_tokens))
                    for name, (k, codec) in configs.items():
                        runs[name].append(served(client, model, ids, args.new_tokens, k, codec))
                    print(
                        f"  round {rnd}: "
                        + ", ".join(f"{n} {r[-1]['decode_tokens_per_s']:.1f}" for n, r in runs.items()),
                        flush=True,
                    )
        finally:
            agent.stop()
    finally:
        edge.stop()
    return runs


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    names = [r["name"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.barh(names, [r["decode_tokens_per_s"] for r in rows], color="#4c72b0")
    a.axvline(0.8 * rows[0]["decode_tokens_per_s"], color="k", ls="--", lw=1, label="80% of monolithic")
    a.set_xlabel("decode tokens/s (higher is better)")
    a.legend(loc="lower right", fontsize=8)
    b.barh(names, [r["ttft_s"] * 1000 for r in rows], color="#dd8452")
    b.set_xlabel("time to first token, 128-token prompt (ms)")
    c.barh(names, [r.get("step_up_bytes", 0) for r in rows], color="#55a868")
    c.set_xlabel("uplink bytes per decode step")
    for ax in (a, b, c):
        ax.invert_yaxis()
    for ax in (b, c):
        ax.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration after one warm-up; best kept")
    args = p.parse_args()

    tok = Tokenizer(args.model)
    n_layers = ModelConfig.from_dir(args.model).num_layers
    ids = prompt_ids(tok, args.prompt_tokens)
    whole = load_slice(args.model)
    configs = [(n_layers if k == 30 else k, codec) for k, codec in CONFIGS]
    names = ["monolithic (in-process)"] + [f"k={k} device only" if k == n_layers else f"k={k} {c}" for k, c in configs]
    runs = measure_rounds(args, whole, ids, dict(zip(names[1:], configs, strict=True)), names[0])
    rows = [
        {
            "name": n,
            "split": None if i == 0 else configs[i - 1][0],
            "codec": None if i == 0 else configs[i - 1][1],
            **best_of(runs[n][1:]),
        }
        for i, n in enumerate(names)
    ]

    mono = rows[0]["decode_tokens_per_s"]
    print(
        f"\nSmolLM2-135M-Instruct fp32, {os.cpu_count()} CPUs, device + edge on one host over loopback; "
        f"{len(ids)}-token prompt, {args.new_tokens} greedy tokens, best of {args.repeats}"
    )
    print(
        f"{'configuration':<26}{'decode tok/s':>13}{'vs mono':>9}{'TTFT ms':>9}{'prefill up B':>13}"
        f"{'step up B':>10}{'down B/tok':>11}"
    )
    for r in rows:
        r["vs_monolithic"] = r["decode_tokens_per_s"] / mono
        print(
            f"{r['name']:<26}{r['decode_tokens_per_s']:>13.1f}{r['vs_monolithic']:>8.0%}{r['ttft_s'] * 1000:>9.0f}"
            f"{r.get('prefill_up_bytes', 0):>13.0f}{r.get('step_up_bytes', 0):>10.0f}"
            f"{r.get('down_bytes_per_token', 0):>11.0f}"
        )
    target = next(r for r in rows if r["split"] == 15 and r["codec"] == "f16")
    vs_served = target["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
    print(
        f"target: k=15 f16 >= 80% of monolithic decode tokens/s -> {target['vs_monolithic']:.0%} "
        f"({'met' if target['vs_monolithic'] >= 0.8 else 'NOT met'}); vs served device-only: {vs_served:.0%}"
    )

    result = {
        "benchmark": "split_overhead",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
        "target_k15_f16_vs_monolithic": target["vs_monolithic"],
        "k15_f16_vs_served_device_only": vs_served,
    }
    write_results(
        RESULTS / "split_overhead.json",
        result,
        lambda png: plot(
            rows, png, f"SmolLM2-135M fp32 split over loopback gRPC ({os.cpu_count()} CPUs shared by device and edge)"
        ),
    )


if __name__ == "__main__":
    main()
