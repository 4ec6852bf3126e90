"""Decode speed of our monolithic model vs transformers' `generate` on the same weights.

Greedy decode tokens/s (128 new tokens after a short chat prompt) and prefill time of a
512-token prompt, both implementations in this one process, one after the other.
Prints a table, writes benchmarks/results/decode_speed.json and .png.

    python benchmarks/decode_speed.py [--model models/smollm2-135m-instruct] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from coinfer.model import load_slice
from coinfer.model.generation import generate, model_step
from coinfer.model.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def long_prompt(tok: Tokenizer, n: int) -> list[int]:
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(n))
    ids = tok.encode(text, add_special_tokens=False)[:n]
    assert len(ids) == n, f"long prompt has {len(ids)} tokens, wanted {n}"
    return ids


def ours_decode(model, ids: list[int], new: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = [t for t, _ in generate(model_step(model), ids, new)]
    return time.perf_counter() - t0, out


def ours_prefill(model, ids: list[int]) -> float:
    with torch.inference_mode():
        cache = model.new_cache()
        t0 = time.perf_counter()
        model(torch.tensor([ids]), cache, last_only=True)
        return time.perf_counter() - t0


def hf_decode(hf, ids: list[int], new: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)  # fmt: skip
        return time.perf_counter() - t0, out[0, len(ids) :].tolist()


def hf_prefill(hf, ids: list[int]) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(torch.tensor([ids]), logits_to_keep=1)
        return time.perf_counter() - t0


def best(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r[0] if isinstance(r, tuple) else r)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["impl"] for r in rows]
    a.bar(names, [r["decode_tokens_per_s"] for r in rows], color=["#4c72b0", "#dd8452"])
    a.set_ylabel("greedy decode tokens/s (higher is better)")
    b.bar(names, [r["prefill_512_s"] * 1000 for r in rows], color=["#4c72b0", "#dd8452"])
    b.set_ylabel("512-token prefill ms (lower is better)")
    fig.suptitle(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, {platform.machine()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    tok = Tokenizer(args.model)
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    long_ids = long_prompt(tok, args.prefill_tokens)
    t0 = time.perf_counter()
    ours = load_slice(args.model)
    ours_load = time.perf_counter() - t0
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    rows, outputs = [], {}
    for impl, dec, pre in [("coinfer", ours_decode, ours_prefill), ("transformers", hf_decode, hf_prefill)]:
        model = ours if impl == "coinfer" else hf
        dec(model, ids, 8)  # warm-up
        secs, out = best(lambda: dec(model, ids, args.new_tokens), args.repeats)
        prefill = best(lambda: pre(model, long_ids), args.repeats)
        outputs[impl] = out
        rows.append({"impl": impl, "decode_tokens_per_s": len(out) / secs, "new_tokens": len(out),
                     "prefill_512_s": prefill, "prefill_tokens": len(long_ids)})  # fmt: skip
    speedup = rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
    same = outputs["coinfer"] == outputs["transformers"]

    print(f"\nSmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads; prompt {len(ids)} tokens, "
          f"{args.new_tokens} greedy new tokens, best of {args.repeats}")  # fmt: skip
    print(f"{'impl':<14}{'decode tok/s':>14}{'prefill 512 (ms)':>18}")
    for r in rows:
        print(f"{r['impl']:<14}{r['decode_tokens_per_s']:>14.1f}{r['prefill_512_s'] * 1000:>18.0f}")
    print(f"decode speed-up vs transformers: {speedup:.2f}x; identical greedy tokens: {same}; "
          f"our model dir loads in {ours_load:.2f}s")  # fmt: skip

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "decode_speed", "threads": torch.get_num_threads(), "machine": platform.machine(),
              "torch": torch.__version__, "rows": rows, "decode_speedup": speedup, "identical_tokens": same,
              "load_s": ours_load}  # fmt: skip
    (RESULTS / "decode_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / "decode_speed.png")
    print(f"wrote {RESULTS / 'decode_speed.json'} and {RESULTS / 'decode_speed.png'}")


if __name__ == "__main__":
    main()
