"""Prefix reuse across chat turns: uplink bytes and time to first token of a 4-turn chat.

Real processes on 127.0.0.1: one edge-server, and two device agents on it, one offering
prefixes (`--prefix-reuse true`, the default) and one not. The same conversation (a
system prompt, then 4 user turns; each turn appends the previous answer, as chat clients
do) runs through each agent's REST API, greedy, `--max-tokens` per answer, at fixed splits.
Per turn: prompt tokens, positions the edge still held (cached), uplink bytes of the
Prefill and of the whole turn (Open + Prefill + one Step per token), TTFT from the agent's
timings. Target: >= 5x fewer uplink bytes over the 4 turns. Prefill bytes are what reuse
can save; a split k > 0 also sends one hidden state per generated token, with or without.
Prints a table, writes benchmarks/results/prefix_reuse.json and .png.

    python benchmarks/prefix_reuse.py [--model models/smollm2-135m-instruct] [--max-tokens 96]
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import httpx
import torch
from _common import RESULTS, parser, pyplot, write_results

from coinfer import wire
from coinfer.tools.launcher import start_agent, start_edge

SYSTEM = (
    "You are the help desk of a small harbour museum. Answer visitors' questions about the museum's "
    "collection of ship models, sea charts and lighthouse lenses in a friendly, factual way."
)
TURNS = [
    "What can I see in the lighthouse room?",
    "How old is the oldest sea chart you have?",
    "Is there anything there for children?",
    "Thanks! When does the museum close today?",
]
CONFIGS = [(15, "f16"), (15, "int8"), (0, wire.TOKEN_IDS)]


def conversation(client: httpx.Client, model: str, k: int, codec: str, max_tokens: int) -> list[dict]:
    messages, rows = [{"role": "system", "content": SYSTEM}], []
    for i, user in enumerate(TURNS):
        messages.append({"role": "user", "content": user})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "split": k}
        if k > 0:
            body["codec"] = codec
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        out = r.json()
        ext, answer = out["coinfer"], out["choices"][0]["message"]["content"]
        rows.append(
            {
                "turn": i + 1,
                "prompt_tokens": out["usage"]["prompt_tokens"],
                "completion_tokens": out["usage"]["completion_tokens"],
                "cached_tokens": ext["cached_tokens"],
                "prefill_up_bytes": ext["prefill_bytes_up"],
                "up_bytes": ext["bytes_up"],
                "ttft_s": ext["timings"]["ttft_seconds"],
                "answer": answer,
            }
        )
        messages.append({"role": "assistant", "content": answer})
    return rows


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        turns = [r["turn"] for r in res["without"]]
        w = 0.38
        ax.bar(
            [t - w / 2 for t in turns],
            [r["up_bytes"] / 1000 for r in res["without"]],
            w,
            label="without reuse",
            color="#c44e52",
        )
        ax.bar(
            [t + w / 2 for t in turns],
            [r["up_bytes"] / 1000 for r in res["with"]],
            w,
            label="with reuse",
            color="#4c72b0",
        )
        ax.bar(
            [t + w / 2 for t in turns],
            [r["prefill_up_bytes"] / 1000 for r in res["with"]],
            w,
            fill=False,
            hatch="//",
            label="of which prefill (with)",
        )
        ax.set_title(
            f"k={res['split']} {res['codec']}: total {res['up_ratio']:.1f}x, prefill {res['prefill_ratio']:.1f}x"
        )
        ax.set_xlabel("chat turn")
        ax.set_ylabel("uplink kB")
        ax.set_xticks(turns)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, 4-turn chat: uplink bytes per turn with and without prefix reuse")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()

    edge = start_edge(args.model)
    agents = {}
    try:
        agents = {
            reuse: start_agent(args.model, edge.ready["grpc"], args=["--prefix-reuse", str(reuse).lower()])
            for reuse in (True, False)
        }
        results = []
        for k, codec in CONFIGS:
            res = {"split": k, "codec": codec}
            for reuse, name in ((False, "without"), (True, "with")):
                with httpx.Client(base_url=agents[reuse].ready["http"], timeout=600) as c:
                    model = c.get("/v1/models").json()["data"][0]["id"]
                    res[name] = conversation(c, model, k, codec, args.max_tokens)
            for key in ("up_bytes", "prefill_up_bytes"):
                res[f"{key}_without"] = sum(r[key] for r in res["without"])
                res[f"{key}_with"] = sum(r[key] for r in res["with"])
            res["up_ratio"] = res["up_bytes_without"] / res["up_bytes_with"]
            res["prefill_ratio"] = res["prefill_up_bytes_without"] / res["prefill_up_bytes_with"]
            res["same_answers"] = [r["answer"] for r in res["with"]] == [r["answer"] for r in res["without"]]
            results.append(res)
    finally:
        for a in agents.values():
            a.stop()
        edge.stop()

    print(
        f"\nSmolLM2-135M-Instruct fp32, {os.cpu_count()} CPUs, device agent + edge over loopback; 4-turn chat, "
        f"greedy, up to {args.max_tokens} tokens per answer"
    )
    print(f"{'config':<14}{'turn':>5}{'prompt':>8}{'cached':>8}{'prefill up B':>22}{'turn up B':>22}{'TTFT ms':>16}")
    print(f"{'':<35}{'without':>11}{'with':>11}{'without':>11}{'with':>11}{'without':>8}{'with':>8}")
    for res in results:
        for a, b in zip(res["without"], res["with"], strict=True):
            print(
                f"{'k=' + str(res['split']) + ' ' + res['codec']:<14}{b['turn']:>5}{b['prompt_tokens']:>8}"
                f"{b['cached_tokens']:>8}{a['prefill_up_bytes']:>11}{b['prefill_up_bytes']:>11}{a['up_bytes']:>11}"
                f"{b['up_bytes']:>11}{a['ttft_s'] * 1000:>8.0f}{b['ttft_s'] * 1000:>8.0f}"
            )
        print(
            f"{'':<14}{'all':>5}{'':>16}{res['prefill_up_bytes_without']:>11}{res['prefill_up_bytes_with']:>11}"
            f"{res['up_bytes_without']:>11}{res['up_bytes_with']:>11}   prefill {res['prefill_ratio']:.1f}x fewer, "
            f"total {res['up_ratio']:.1f}x fewer; same answers: {'yes' if res['same_answers'] else 'NO'}"
        )
    for res in results:
        print(
            f"target k={res['split']} {res['codec']}: >= 5x fewer uplink bytes over 4 turns -> total "
            f"{res['up_ratio']:.1f}x ({'met' if res['up_ratio'] >= 5 else 'NOT met'}), prefill "
            f"{res['prefill_ratio']:.1f}x ({'met' if res['prefill_ratio'] >= 5 else 'NOT met'})"
        )

    write_results(
        RESULTS / "prefix_reuse.json",
        {
            "benchmark": "prefix_reuse",
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "max_tokens": args.max_tokens,
            "results": results,
        },
        lambda png: plot(results, png),
    )


if __name__ == "__main__":
    main()
