"""Why coinfer/compute.py exists: decode speed when one thread runs all torch work vs two threads.

Phase 1: load + decode on one worker thread (the main thread never touches torch).
Phase 2: the main thread runs the same decode once (creating its own OpenMP team), then the
worker decodes again. Prints tokens/s of each, writes benchmarks/results/compute_thread.json and .png.

    python benchmarks/compute_thread.py [--model models/smollm2-135m-instruct] [--steps 60]
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import RESULTS, parser, pyplot, write_results

from coinfer.model import load_slice


def decode_rate(model, steps: int) -> float:
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.arange(100, 228)[None], cache)  # 128-token prefill
        t0 = time.perf_counter()
        for _ in range(steps):
            model(torch.tensor([[5]]), cache, last_only=True)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    worker = ThreadPoolExecutor(1)
    model = worker.submit(load_slice, args.model).result()
    one = max(worker.submit(decode_rate, model, args.steps).result() for _ in range(3))
    main_rate = decode_rate(model, args.steps)  # the main thread now has an OpenMP team too
    two = max(worker.submit(decode_rate, model, args.steps).result() for _ in range(3))
    print(f"{torch.get_num_threads()} torch threads, SmolLM2 decode steps after a 128-token prefill, best of 3")
    print(f"{'torch work on':<44}{'tokens/s':>10}")
    print(f"{'one thread only':<44}{one:>10.1f}")
    print(f"{'main thread (after the worker had run)':<44}{main_rate:>10.1f}")
    print(f"{'worker again, after the main thread ran':<44}{two:>10.1f}")
    out = {
        "benchmark": "compute_thread",
        "threads": torch.get_num_threads(),
        "one_thread_tokens_per_s": one,
        "main_after_worker_tokens_per_s": main_rate,
        "worker_after_main_tokens_per_s": two,
    }
    write_results(RESULTS / "compute_thread.json", out, lambda png: plot(one, main_rate, two, png))


def plot(one: float, main_rate: float, two: float, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh(["one thread only", "main, after worker", "worker, after main"], [one, main_rate, two], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_title(f"torch work from one thread vs two ({torch.get_num_threads()} torch threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
