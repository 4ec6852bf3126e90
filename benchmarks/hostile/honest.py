"""The honest traffic: the real device code (device_agent Engine with its EdgeRunner and retry
policy), 8 greedy sessions at once, and the device's own counters."""

from __future__ import annotations

import threading
import time
from itertools import pairwise

from hostile.common import HONEST_SPLITS, K_SPLIT, TOPICS


def build_engine(args, addr: str, token: str | None):
    """The real device code: head, tokenizer, edge pool, EdgeRunner with its retry policy; with its
    own bearer token (the honest devices' client identity) unless --no-tokens."""
    from device_agent.cli import build_app
    from device_agent.config import AgentSettings

    settings = AgentSettings(
        model_dir=str(args.model),
        edge=addr,
        edge_token=token or "",
        split="0",
        codec=args.codec,
        max_device_layers=K_SPLIT,
        torch_threads=1,
        busy_wait_seconds=args.busy_wait_seconds,
        connect_timeout_seconds=10,
        request_timeout_seconds=args.max_attack_seconds + 60,
    )
    return build_app(settings).state.logic.engine


def device_counters(engine) -> dict:
    """The device's own count of busy retries, replays, fallbacks and edge errors by status."""
    out: dict = {"edge_errors": {}}
    for metric in engine.metrics.registry.collect():
        for smp in metric.samples:
            if smp.name == "coinfer_edge_errors_total":
                out["edge_errors"][smp.labels["code"]] = smp.value
            elif smp.name in (
                "coinfer_busy_retries_total",
                "coinfer_replays_total",
                "coinfer_resumes_total",
                "coinfer_local_fallbacks_total",
            ):
                out[smp.name[len("coinfer_") : -len("_total")]] = smp.value
    return out


def counters_delta(before: dict, after: dict) -> dict:
    out = {k: v - before.get(k, 0) for k, v in after.items() if k != "edge_errors"}
    out["edge_errors"] = {
        c: n - before["edge_errors"].get(c, 0)
        for c, n in after["edge_errors"].items()
        if n != before["edge_errors"].get(c, 0)
    }
    return out


def prompts(engine) -> list[list[int]]:
    return [
        engine.tokenizer.encode_chat([{"role": "user", "content": f"Explain {topic} in a few paragraphs."}])
        for topic in TOPICS
    ]


def one_session(engine, ids: list[int], k: int, new: int, t0: float) -> dict:
    """One honest session: its tokens, their arrival times (seconds since t0), TTFT, ITL and the
    device's retry stats, or the error that ended it."""
    from coinfer.model.sampling import SamplingParams
    from device_agent.generate import GenerationRequest, Result

    rec = {"split": k, "prompt_tokens": len(ids), "tokens": [], "arrivals": [], "error": None}
    start = time.monotonic()
    rec["start"] = start - t0
    try:
        for ev in engine.stream(
            GenerationRequest(ids, new, SamplingParams(), split=k, codec=engine.settings.routing.codec, ignore_eos=True)
        ):
            now = time.monotonic()
            if isinstance(ev, Result):
                st = ev.stats
                rec.update(
                    busy_retries=st.busy_retries,
                    replays=st.replays,
                    resumes=st.resumes,
                    local_fallback=st.fallback,
                    finish=ev.finish_reason,
                )
            elif ev.token_id >= 0:
                rec["tokens"].append(ev.token_id)
                rec["arrivals"].append(now - t0)
    except Exception as e:  # an honest session the edge did not serve: that is the result, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"
    a = rec["arrivals"]
    rec["ttft_s"] = a[0] - rec["start"] if a else None
    rec["itl_s"] = [y - x for x, y in pairwise(a)]
    rec["end"] = time.monotonic() - t0
    return rec


def honest_run(engine, ids_list: list[list[int]], new: int, t0: float) -> list[dict]:
    """All honest sessions at once, one thread each."""
    out: list[dict | None] = [None] * len(HONEST_SPLITS)

    def run(i: int) -> None:
        out[i] = one_session(engine, ids_list[i], HONEST_SPLITS[i], new, t0)

    threads = [threading.Thread(target=run, args=(i,), name=f"honest-{i}") for i in range(len(HONEST_SPLITS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out  # type: ignore[return-value]
