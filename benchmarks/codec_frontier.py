"""The bytes / accuracy frontier of hidden-state codecs: every codec at every cut k of SmolLM2.

On the built-in held-out text (coinfer/model/texts.py HELDOUT_PROSE, ~1,050 positions; the
planner's table is calibrated on a different text), for every codec and every cut k in
1..N-1: bytes per token of the text's hidden states as one frame (a prefill; f32 = 2,304 B
of payload), bytes of a one-token frame (a decode step; mean of 32), greedy-token agreement
with the lossless model (teacher-forced, every position) and mean KL. Targets: a codec >= 8x
smaller than f32 with >= 99% agreement and mean KL <= 0.005 at every cut; one >= 12x with
>= 97%. Prints a summary per codec, writes benchmarks/results/codec_frontier.json and .png.

    python benchmarks/codec_frontier.py [--model models/smollm2-135m-instruct]
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, parser, pyplot, write_results

from coinfer import codec as codecs
from coinfer import compute
from coinfer.codec_accuracy import hidden_after_every_layer, measure
from coinfer.model import load_slice
from coinfer.model.texts import HELDOUT_PROSE
from coinfer.model.tokenizer import Tokenizer

F32_BYTES = 576 * 4


def step_bytes(model, ids: list[int], names: list[str]) -> dict[str, dict[int, float]]:
    """Mean size of a one-token frame per codec and cut (32 positions of the text)."""
    with torch.inference_mode():
        states = hidden_after_every_layer(model, ids[:64])
    return {
        c: {
            k: statistics.mean(len(codecs.encode(states[k][t : t + 1], c)) for t in range(32, 64))
            for k in range(1, model.num_layers)
        }
        for c in names
    }


def plot(rows: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, cuts in rows.items():
        ax.scatter(
            [F32_BYTES / c["bytes_per_token"] for c in cuts.values()],
            [100 * c["agreement"] for c in cuts.values()],
            s=12,
            label=name,
        )
    ax.axvline(8, color="k", ls="--", lw=0.8)
    ax.axhline(99, color="k", ls="--", lw=0.8)
    ax.axvline(12, color="grey", ls=":", lw=0.8)
    ax.axhline(97, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("compression vs f32 (x, prefill frame)")
    ax.set_ylabel("greedy-token agreement with lossless (%)")
    ax.set_title("SmolLM2-135M hidden-state codecs, every cut k = 1..29 (held-out text)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()

    ids = Tokenizer(args.model).encode(HELDOUT_PROSE, add_special_tokens=False)
    names = [c for c in codecs.CODECS if not codecs.CODECS[c].lossless]
    model = compute.run(load_slice, args.model)
    t0 = time.perf_counter()
    table = compute.run(
        measure,
        model,
        ids,
        names,
        range(1, model.num_layers),
        progress=lambda k: print(f"  cut {k} done ({time.perf_counter() - t0:.0f} s)", flush=True),
    )
    steps = compute.run(step_bytes, model, ids, names)
    rows = {c: {k: {**vars(e), "step_bytes": steps[c][k]} for k, e in cuts.items()} for c, cuts in table.table.items()}

    print(
        f"\nSmolLM2-135M-Instruct, {len(ids)} held-out positions, every cut k = 1..{model.num_layers - 1}; "
        f"x = f32 bytes / codec bytes per token of a prefill frame"
    )
    print(
        f"{'codec':<7}{'B/token':>9}{'x (min)':>9}{'step B':>8}{'agree min':>11}{'median':>8}{'KL max':>9}"
        f"{'KL median':>11}"
    )
    summary = {}
    for c, cuts in rows.items():
        vals = list(cuts.values())
        s = {
            "bytes_per_token_median": statistics.median(v["bytes_per_token"] for v in vals),
            "compression_min": min(F32_BYTES / v["bytes_per_token"] for v in vals),
            "step_bytes_median": statistics.median(v["step_bytes"] for v in vals),
            "agreement_min": min(v["agreement"] for v in vals),
            "agreement_median": statistics.median(v["agreement"] for v in vals),
            "kl_max": max(v["mean_kl"] for v in vals),
            "kl_median": statistics.median(v["mean_kl"] for v in vals),
        }
        summary[c] = s
        print(
            f"{c:<7}{s['bytes_per_token_median']:>9.0f}{s['compression_min']:>8.1f}x{s['step_bytes_median']:>8.0f}"
            f"{s['agreement_min']:>10.1%}{s['agreement_median']:>8.1%}{s['kl_max']:>9.4f}{s['kl_median']:>11.5f}"
        )
    t1 = [
        c
        for c, s in summary.items()
        if s["compression_min"] >= 8 and s["agreement_min"] >= 0.99 and s["kl_max"] <= 0.005
    ]
    t2 = [c for c, s in summary.items() if s["compression_min"] >= 12 and s["agreement_min"] >= 0.97]
    print(f"target >= 8x, >= 99% agreement, KL <= 0.005 at every cut: {', '.join(t1) or 'NOT met by any codec'}")
    print(f"target >= 12x, >= 97% agreement at every cut: {', '.join(t2) or 'NOT met by any codec'}")

    write_results(
        RESULTS / "codec_frontier.json",
        {
            "benchmark": "codec_frontier",
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "positions": len(ids),
            "summary": summary,
            "rows": {c: {str(k): v for k, v in cuts.items()} for c, cuts in rows.items()},
            "target_8x_99": t1,
            "target_12x_97": t2,
        },
        lambda png: plot(rows, png),
        indent=1,
    )


if __name__ == "__main__":
    main()
