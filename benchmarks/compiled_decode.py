"""Eager vs compiled decode step (the device's `compile` setting), A/B in one process.

For each precision: one model decoding eagerly and one with `coinfer.model.compiled.compile_decode`,
greedy generation of --new-tokens after a short chat prompt, alternating eager / compiled for
--rounds rounds (this host's speed drifts; alternation keeps the two comparable). Prints the
median and best tokens/s of each, the compile (+ warm-up) seconds and whether both generated the
same tokens. Writes benchmarks/results/compiled_decode.json and .png.

    python benchmarks/compiled_decode.py [--model models/smollm2-135m-instruct] [--new-tokens 128 300]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, parser, pyplot, write_results

from coinfer.model import load_slice
from coinfer.model.compiled import compile_decode
from coinfer.model.generation import generate, model_step
from coinfer.model.tokenizer import Tokenizer

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def rate(model, ids: list[int], new: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = [t for t, _ in generate(model_step(model), ids, new)]
    return len(out) / (time.perf_counter() - t0), out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--precisions", nargs="+", default=["int4", "int8", "fp32"])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[128, 300])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    ids = Tokenizer(args.model).encode_chat([{"role": "user", "content": PROMPT}])
    rows = []
    for precision in args.precisions:
        eager, compiled = load_slice(args.model, precision=precision), load_slice(args.model, precision=precision)
        seconds = compile_decode(compiled)
        if seconds is None:
            raise SystemExit("torch.compile failed on this host (see the warning above)")
        for new in args.new_tokens:
            runs: dict[str, list[float]] = {"eager": [], "compiled": []}
            outs = {}
            for _ in range(args.rounds):
                for name, m in (("eager", eager), ("compiled", compiled)):
                    r, outs[name] = rate(m, ids, new)
                    runs[name].append(r)
            rows.append(
                {
                    "precision": precision,
                    "new_tokens": new,
                    "compile_s": seconds,
                    "same_tokens": outs["eager"] == outs["compiled"],
                    "eager": runs["eager"],
                    "compiled": runs["compiled"],
                }
            )
    print(f"\n{torch.get_num_threads()} threads, {args.rounds} alternating rounds, tokens/s median (best)")
    print(f"{'precision':<10}{'new':>5}{'eager':>16}{'compiled':>16}{'speed-up':>10}{'compile s':>11}{'same':>6}")
    for r in rows:
        e, c = statistics.median(r["eager"]), statistics.median(r["compiled"])
        r["speedup_median"] = c / e
        print(
            f"{r['precision']:<10}{r['new_tokens']:>5}{e:>9.1f} ({max(r['eager']):4.1f}){c:>9.1f} "
            f"({max(r['compiled']):4.1f}){c / e:>9.2f}x{r['compile_s']:>11.1f}{str(r['same_tokens']):>6}"
        )
    out = {
        "benchmark": "compiled_decode",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "rows": rows,
    }
    write_results(RESULTS / "compiled_decode.json", out, lambda png: plot(rows, png))


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['precision']}, {r['new_tokens']} tok" for r in rows]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [statistics.median(r["eager"]) for r in rows], 0.4, label="eager")
    ax.barh([i - 0.2 for i in y], [statistics.median(r["compiled"]) for r in rows], 0.4, label="compiled")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("greedy decode tokens/s, median of alternating rounds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
