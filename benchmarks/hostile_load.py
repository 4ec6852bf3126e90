"""Hostile load: honest streamed sessions against one edge while an attacker tries to take it over.

A real `edge-server` process on 127.0.0.1 (its deadlines shortened so the attack cycles several
times in a short run: the edge flags are printed with the results and stored in the JSON), run as
the recommended deployment: per-device bearer tokens (`--auth-tokens`, one for the honest devices,
one for the attacker, one for this script's health / Describe / metrics polling, random per run)
and per-client limits (`--max-streams-per-client 12` of `--max-streams 32`, `--max-sessions-per-client 8`
of 16), so the attacker, one client identity, cannot hold every stream or session slot. The honest
device sends its token through AgentSettings(edge_token=...), the attacker sends its own in every
call's metadata. `--no-tokens` runs the edge without tokens instead: on loopback every caller then
is the same client identity (its address), so the per-client limits cannot tell the attacker from
the honest devices, and the honest sessions are starved of slots (busy retries, long TTFT). Honest traffic is the real
device code in this process (device_agent Engine with its EdgeRunner and retry policy, as
tests/component/test_resume.py drives it): 8 greedy sessions, half at split k = 0 and half at k = 15,
all started at once, `--new-tokens` each (ignore_eos, so every session makes exactly that many).
The device holds layers [0, 15) only, so a session the edge does not serve fails visibly instead
of finishing on the device. First a quiet run; then the same 8 prompts again while an attacker
(a separate process, loopback only) runs, from `--attack-lead-seconds` before the honest
sessions until they are done (at least `--min-attack-seconds`, at most `--max-attack-seconds`):

- 48 silent streams: open Generate and never send a message (nor half-close); when the edge
  ends one, it is opened again at once (a refused one after `--attack-retry-seconds`);
- 16 Open-only streams: send a valid Open, then nothing; reopened likewise;
- a flood of maximal Opens: Open messages padded to just under the edge's message limit (a huge
  prefix_hashes list, a huge stop_ids list, a huge session id, in turn), each to be refused;
- poison frames: sessions at k = 15 that prefill a finite frame, then send Step frames full of NaN
  (written by hand: the codec's encoder refuses them) or, in turn, of finite f32 values near the
  f32 maximum (3e38), which pass the codec and reach the decode batch the honest sessions share;
  one Step after each token, until the edge ends the session; then reopened.

Measured: each honest session's tokens (must equal the quiet run's), TTFT (admission retries
included, reported apart) and per-token arrival times (inter-token latency, ITL); the edge's RSS
(/proc/<pid>/status VmRSS) before the attack, its peak and after it; gRPC health Check and
Describe polled every ~100 ms throughout (latency, failures); what the attacker got (refusals,
how long the edge let each kind of stream live, status codes). Targets: every honest session
finishes with the quiet run's output; honest p99 ITL <= 2x the quiet run's; edge RSS after the
attack within +10% of before it; health and Describe answer throughout (no failure, < 1 s).
Prints a table and PASS/FAIL lines, writes benchmarks/results/hostile_load.json and .png.

    python benchmarks/hostile_load.py [--model models/smollm2-135m-instruct] [--new-tokens 64]
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import platform
import queue
import re
import shlex
import threading
import time
from itertools import pairwise
from pathlib import Path

import grpc
import httpx
from _common import RESULTS, parser, pyplot, write_results
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coinfer import wire
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc

LOOPBACK = "127.0.0.1"
K_SPLIT = 15
HONEST_SPLITS = (0, 0, 0, 0, K_SPLIT, K_SPLIT, K_SPLIT, K_SPLIT)
TOPICS = (
    "how tides work",
    "the history of the lantern",
    "why rivers meander",
    "how bread rises",
    "how a steam engine works",
    "why the sky is blue",
    "how bees make honey",
    "how a letter is delivered",
)
HEALTH_TARGET_S = 1.0
GENERATE = "/coinfer.v1.EdgeInference/Generate"
IDENTITIES = ("honest", "attacker", "monitor")  # one bearer token each (unless --no-tokens)


def bearer_md(token: str | None) -> tuple[tuple[str, str], ...]:
    return wire.bearer_metadata(token) if token else ()


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def edge_outcomes(ops: str, headers: dict[str, str]) -> dict[str, float]:
    """Session outcomes and deadline-ended streams from the edge's /metrics."""
    try:
        text = httpx.get(ops + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r'coinfer_sessions_total\{outcome="([^"]+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        elif line.startswith("coinfer_streams_ended_total "):
            out["streams_ended_by_deadline"] = float(line.split()[1])
    return out


# ---------------------------------------------------------------------------------------- watchers
class Watch(threading.Thread):
    """Every `period` s until stopped (bounded by `max_seconds`): gRPC health Check and Describe
    (latency or failure), the sessions the edge holds, and the edge's RSS."""

    def __init__(
        self, addr: str, pid: int, t0: float, token: str | None, period: float = 0.1, max_seconds: float = 900
    ) -> None:
        super().__init__(name="watch", daemon=True)
        self.addr, self.pid, self.t0, self.period, self.max_seconds = addr, pid, t0, period, max_seconds
        self.metadata = bearer_md(token)  # health Check needs none; Describe does when the edge has tokens
        self.samples: list[dict] = []  # t, health_s, describe_s (None = failed), sessions, rss
        self.failures: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.max_seconds
        with grpc.insecure_channel(self.addr) as ch:
            health, edge = health_pb2_grpc.HealthStub(ch), edge_pb2_grpc.EdgeInferenceStub(ch)
            while not self._halt.is_set() and time.monotonic() < end:
                t = time.monotonic()
                sample = {
                    "t": t - self.t0,
                    "health_s": None,
                    "describe_s": None,
                    "sessions": None,
                    "rss_mib": rss_mib(self.pid),
                }
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        sample["health_s"] = time.monotonic() - t
                    else:
                        self.failures.append({"t": sample["t"], "call": "health", "error": f"status {reply.status}"})
                except grpc.RpcError as e:
                    self.failures.append({"t": sample["t"], "call": "health", "error": e.code().name})
                t1 = time.monotonic()
                try:
                    d = edge.Describe(pb.DescribeRequest(), timeout=5, metadata=self.metadata)
                    sample["describe_s"], sample["sessions"] = time.monotonic() - t1, d.load.active_sessions
                except grpc.RpcError as e:
                    self.failures.append({"t": sample["t"], "call": "describe", "error": e.code().name})
                self.samples.append(sample)
                self._halt.wait(max(0.0, self.period - (time.monotonic() - t)))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)

    def span(self, a: float, b: float) -> dict:
        """Health / Describe latency and failures between a and b (seconds since t0)."""
        ss = [s for s in self.samples if a <= s["t"] <= b]
        hs = [s["health_s"] for s in ss if s["health_s"] is not None]
        ds = [s["describe_s"] for s in ss if s["describe_s"] is not None]
        fails = [f for f in self.failures if a <= f["t"] <= b]
        gaps = [y["t"] - x["t"] for x, y in pairwise(ss)]  # a slow answer shows as a gap too
        return {
            "polls": len(ss),
            "failures": len(fails),
            "failure_examples": fails[:5],
            "health_max_ms": 1000 * max(hs, default=float("nan")),
            "health_p99_ms": 1000 * pct(hs, 99),
            "describe_max_ms": 1000 * max(ds, default=float("nan")),
            "describe_p99_ms": 1000 * pct(ds, 99),
            "longest_poll_gap_ms": 1000 * max(gaps, default=float("nan")),
        }


# ---------------------------------------------------------------------------------------- honest
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
    from coinfer.model.sampling import SamplingParams
    from device_agent.generate import GenerationRequest, Result

    rec = {"split": k, "prompt_tokens": len(ids), "tokens": [], "arrivals": [], "error": None}
    start = time.monotonic()
    rec["start"] = start - t0
    try:
        for ev in engine.stream(
            GenerationRequest(ids, new, SamplingParams(), split=k, codec=engine.settings.codec, ignore_eos=True)
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


# ---------------------------------------------------------------------------------------- attacker
def maximal_opens(fp: str, limit: int, vocab: int) -> dict[str, bytes]:
    """Serialized DeviceMessages with one Open each, padded to just under `limit` bytes."""
    target = limit - 1024

    def fit(make) -> bytes:
        per_item = make(20000).ByteSize() / 20000
        n = int(target / per_item)
        for _ in range(20):
            blob = make(n).SerializeToString()
            if len(blob) <= target:
                return blob
            n -= int((len(blob) - target) / per_item) + 1
        return blob

    def hashes(n: int) -> pb.DeviceMessage:
        return pb.DeviceMessage(
            open=pb.Open(
                session_id="flood-hashes",
                fingerprint=fp,
                split=0,
                max_new_tokens=8,
                prefix_hashes=[i.to_bytes(32, "little") for i in range(n)],
                prefix_lengths=[16 * (1 + i % 4096) for i in range(n)],
            )
        )

    def stops(n: int) -> pb.DeviceMessage:
        return pb.DeviceMessage(
            open=pb.Open(
                session_id="flood-stops",
                fingerprint=fp,
                split=0,
                max_new_tokens=8,
                stop_ids=[(i * 7919) % vocab for i in range(n)],
            )
        )

    def sid(n: int) -> pb.DeviceMessage:
        return pb.DeviceMessage(open=pb.Open(session_id="s" * n, fingerprint=fp, split=0, max_new_tokens=8))

    return {"prefix_hashes": fit(hashes), "stop_ids": fit(stops), "session_id": fit(sid)}


class Tally:
    """Per attack kind: streams tried, their end codes, how long the edge let admitted ones live."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kinds: dict[str, dict] = collections.defaultdict(
            lambda: {"streams": 0, "codes": collections.Counter(), "held_s": [], "opened": 0, "details": {}}
        )

    def add(self, kind: str, code: str, held: float | None = None, opened: bool = False, detail: str = "") -> None:
        with self.lock:
            k = self.kinds[kind]
            k["streams"] += 1
            k["codes"][code] += 1
            k["opened"] += int(opened)
            if held is not None:
                k["held_s"].append(held)
            if detail and code not in k["details"]:
                k["details"][code] = detail[:200]

    def report(self) -> dict:
        with self.lock:
            out = {}
            for name, k in self.kinds.items():
                held = k["held_s"]
                out[name] = {
                    "streams": k["streams"],
                    "codes": dict(k["codes"]),
                    "opened": k["opened"],
                    "held_by_edge": len(held),
                    "held_median_s": pct(held, 50),
                    "held_max_s": max(held, default=0.0),
                    "details": k["details"],
                    **{x: k[x] for x in k if x not in ("streams", "codes", "held_s", "opened", "details")},
                }
            return out


def attacker_main(cfg: dict, stop, out) -> None:
    """The attacker process. Every loop stops by itself: on `stop`, at cfg['max_seconds'], or after
    cfg['max_cycles'] streams."""
    host = cfg["grpc"].rsplit(":", 1)[0]
    if host != LOOPBACK:
        out.put({"error": f"the attacker only targets {LOOPBACK}, not {host}"})
        return
    t_end = time.monotonic() + cfg["max_seconds"]
    md = bearer_md(cfg["token"])  # the attacker's own client identity, on every call
    tally, live, stopping = Tally(), set(), threading.Event()
    live_lock = threading.Lock()
    flood = {"bytes_sent": 0, "sizes": {}}
    nan = {"frames_sent": 0, "tokens_back": 0}
    opts = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", 32 << 20),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [grpc.insecure_channel(cfg["grpc"], options=opts + [("coinfer.attacker", i)]) for i in range(6)]

    def running() -> bool:
        return not stop.is_set() and not stopping.is_set() and time.monotonic() < t_end

    def rest(code: str) -> None:
        stop.wait(cfg["retry_seconds"] if code == "RESOURCE_EXHAUSTED" else cfg["reopen_seconds"])

    def held_stream(kind: str, ch: grpc.Channel, first: pb.DeviceMessage | None) -> None:
        """Open a stream, send `first` (or nothing), then hold it silent until the edge ends it."""
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        for _ in range(cfg["max_cycles"]):
            if not running():
                return
            q: queue.Queue = queue.Queue()
            if first is not None:
                q.put(first)
            t0 = time.monotonic()
            call = stub.Generate(iter(q.get, None), timeout=cfg["max_seconds"] + 30, metadata=md)
            with live_lock:
                live.add(call)
            code, detail, opened = "OK", "", False
            try:
                for reply in call:
                    if reply.WhichOneof("kind") == "opened":
                        opened, t0 = True, time.monotonic()  # Open-only: held from Opened on
            except grpc.RpcError as e:
                code, detail = e.code().name, e.details() or ""
            finally:
                q.put(None)  # ends the request iterator's thread
                with live_lock:
                    live.discard(call)
            by_edge = code not in ("RESOURCE_EXHAUSTED",) and not stopping.is_set()
            tally.add(
                kind,
                code if not stopping.is_set() else "ended_by_attacker_at_stop",
                time.monotonic() - t0 if by_edge else None,
                opened,
                detail,
            )
            rest(code)

    def flood_loop(ch: grpc.Channel, blobs: dict[str, bytes], offset: int) -> None:
        call = ch.stream_stream(GENERATE, request_serializer=None, response_deserializer=pb.EdgeMessage.FromString)
        names = list(blobs)
        for n in range(cfg["max_cycles"]):
            if not running():
                return
            name = names[(n + offset) % len(names)]
            code, detail = "OK", ""
            try:
                list(call(iter([blobs[name]]), timeout=30, metadata=md))
            except grpc.RpcError as e:
                code, detail = e.code().name, e.details() or ""
            with tally.lock:
                flood["bytes_sent"] += len(blobs[name])
            tally.add(f"flood:{name}", code, detail=detail)
            if code == "RESOURCE_EXHAUSTED":
                rest(code)

    def nan_loop(ch: grpc.Channel, idx: int) -> None:
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        for n in range(cfg["max_cycles"]):
            if not running():
                return
            kind = "nan" if n % 2 == 0 else "huge"
            frame = cfg["nan_frame"] if kind == "nan" else cfg["huge_frame"]
            q: queue.Queue = queue.Queue()
            q.put(
                pb.DeviceMessage(
                    open=pb.Open(
                        session_id=f"poison-{idx}-{n}",
                        fingerprint=cfg["fp"],
                        split=K_SPLIT,
                        codec="f32",
                        max_new_tokens=64,
                    )
                )
            )
            call = stub.Generate(iter(q.get, None), timeout=60, metadata=md)
            with live_lock:
                live.add(call)
            code, detail, opened, poisoned = "OK", "", False, False
            try:
                for reply in call:
                    what = reply.WhichOneof("kind")
                    if what == "opened":
                        opened = True
                        q.put(pb.DeviceMessage(prefill=pb.Prefill(frame=cfg["prefill_frame"])))
                    elif what == "token":
                        with tally.lock:
                            nan["tokens_back"] += int(poisoned)  # the edge sampled a token from the poison
                        if reply.token.finish_reason or not running():
                            q.put(None)
                            continue
                        with tally.lock:
                            nan["frames_sent"] += 1
                        poisoned = True
                        q.put(pb.DeviceMessage(step=pb.Step(frame=frame)))  # the poison, again and again
            except grpc.RpcError as e:
                code, detail = e.code().name, e.details() or ""
            finally:
                q.put(None)
                with live_lock:
                    live.discard(call)
            tally.add(
                f"poison:{kind}",
                code if not stopping.is_set() else "ended_by_attacker_at_stop",
                opened=opened,
                detail=detail,
            )
            rest(code)
        return

    blobs = maximal_opens(cfg["fp"], cfg["max_message_bytes"], cfg["vocab"])
    flood["sizes"] = {k: len(v) for k, v in blobs.items()}
    silent_open = pb.DeviceMessage(
        open=pb.Open(session_id="", fingerprint=cfg["fp"], split=K_SPLIT, codec="f16", max_new_tokens=64)
    )
    threads = []
    for i in range(cfg["silent"]):
        threads.append(threading.Thread(target=held_stream, args=("silent", channels[i % 3], None), daemon=True))
    for i in range(cfg["open_only"]):
        msg = pb.DeviceMessage()
        msg.CopyFrom(silent_open)
        msg.open.session_id = f"open-only-{i}"
        threads.append(threading.Thread(target=held_stream, args=("open_only", channels[3], msg), daemon=True))
    for i in range(cfg["flood"]):
        threads.append(threading.Thread(target=flood_loop, args=(channels[4], blobs, i), daemon=True))
    for i in range(cfg["poison"]):
        threads.append(threading.Thread(target=nan_loop, args=(channels[5], i), daemon=True))
    out.put({"ready": True, "t": time.monotonic()})
    for t in threads:
        t.start()
    stop.wait(max(0.0, t_end - time.monotonic()))
    stopping.set()
    with live_lock:
        calls = list(live)
    for c in calls:
        c.cancel()
    for t in threads:
        t.join(timeout=10)
    out.put(
        {
            "tally": tally.report(),
            "flood": flood,
            "poison": nan,
            "threads_still_running": sum(t.is_alive() for t in threads),
        }
    )
    for ch in channels:
        ch.close()


def poison_frames(hidden: int) -> dict[str, bytes]:
    """A finite prefill frame (8 tokens), a Step frame of NaN (the codec's encoder refuses NaN, so the
    body is written by hand, as a hostile device would) and one of finite values near the f32 maximum."""
    import numpy as np
    import torch
    import zstandard

    from coinfer import codec

    torch.manual_seed(0)
    prefill = codec.encode(torch.randn(8, hidden), "f32")
    ok = codec.encode(torch.zeros(1, hidden), "f32")
    hlen = int.from_bytes(ok[:4], "little")
    body = zstandard.ZstdCompressor(write_content_size=True).compress(np.full(hidden, np.nan, np.float32).tobytes())
    nan_frame = ok[: 4 + hlen] + body
    huge = codec.encode(torch.full((1, hidden), 3.0e38), "f32")
    return {"prefill_frame": prefill, "nan_frame": nan_frame, "huge_frame": huge}


# ---------------------------------------------------------------------------------------- report
def itl_stats(sessions: list[dict]) -> dict:
    gaps = [g for s in sessions for g in s["itl_s"]]
    ttft = [s["ttft_s"] for s in sessions if s["ttft_s"] is not None]
    # how many honest sessions were decoding at once, per gap: fewer at once decode faster, so a run
    # whose sessions got in one by one is not held to the same load as one where all ran together
    spans = [(s["arrivals"][0], s["arrivals"][-1]) for s in sessions if s["arrivals"]]
    mids = [(x + y) / 2 for s in sessions for x, y in pairwise(s["arrivals"])]
    together = [sum(a <= m <= b for a, b in spans) for m in mids]
    return {
        "itl_p50_ms": 1000 * pct(gaps, 50),
        "itl_p99_ms": 1000 * pct(gaps, 99),
        "itl_max_ms": 1000 * max(gaps, default=float("nan")),
        "itl_samples": len(gaps),
        "honest_decoding_at_once_mean": sum(together) / len(together) if together else float("nan"),
        "ttft_median_s": pct(ttft, 50),
        "ttft_max_s": max(ttft, default=float("nan")),
    }


def plot(result: dict, quiet: list[dict], attacked: list[dict], watch: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for name, sessions, color in (("quiet", quiet, "tab:blue"), ("attacked", attacked, "tab:red")):
        for k, ls in ((0, "-"), (K_SPLIT, "--")):
            gaps = sorted(1000 * g for s in sessions if s["split"] == k for g in s["itl_s"])
            if gaps:
                ax.plot(
                    gaps, [(i + 1) / len(gaps) for i in range(len(gaps))], ls=ls, color=color, label=f"{name}, k={k}"
                )
    ax.set_xscale("log")
    ax.set_xlabel("honest inter-token latency (ms)")
    ax.set_ylabel("fraction of gaps")
    ax.set_title("ITL distribution (CDF)")
    ax.legend(fontsize=8)
    a0, a1 = result["attack"]["start_s"], result["attack"]["end_s"]
    ax = axes[1]
    ax.plot([s["t"] for s in watch], [s["rss_mib"] for s in watch], label="edge RSS (MiB)")
    ax.axhline(result["rss"]["before_attack_mib"] * 1.1, color="k", ls="--", lw=0.8, label="before attack + 10%")
    ax.axvspan(a0, a1, color="tab:red", alpha=0.12, label="attack")
    ax2 = ax.twinx()
    ax2.plot(
        [s["t"] for s in watch if s["sessions"] is not None],
        [s["sessions"] for s in watch if s["sessions"] is not None],
        color="tab:orange",
        alpha=0.6,
        lw=0.8,
        label="sessions held",
    )
    ax2.set_ylabel("sessions held (Describe)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title("edge memory and session slots")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    for key, label in (("health_s", "health Check"), ("describe_s", "Describe")):
        pts = [(s["t"], 1000 * s[key]) for s in watch if s[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=label)
    fails = [s["t"] for s in watch if s["health_s"] is None or s["describe_s"] is None]
    if fails:
        ax.plot(fails, [1000 * HEALTH_TARGET_S] * len(fails), "kx", label="failed")
    ax.axvspan(a0, a1, color="tab:red", alpha=0.12, label="attack")
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("ms")
    ax.set_title("health and Describe latency (every ~100 ms)")
    ax.legend(fontsize=8)
    who = (
        "per-device tokens, per-client limits"
        if result["client_identities"]["tokens"]
        else "no tokens: one client identity for all"
    )
    fig.suptitle(f"Hostile load: 8 honest sessions vs silent, Open-only, maximal-Open and NaN streams ({who})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS / "hostile_load.json"), help="JSON path; the PNG goes next to it")
    p.add_argument("--codec", default="f16", help="codec of the honest k = 15 sessions")
    p.add_argument("--first-message-seconds", type=float, default=2.0, help="edge flag (its default: 10)")
    p.add_argument("--stream-idle-seconds", type=float, default=5.0, help="edge flag (its default: 60)")
    p.add_argument(
        "--no-tokens",
        action="store_true",
        help="run the edge without bearer tokens: honest devices and attacker are then one client "
        "identity (loopback address), so the per-client limits cannot keep the attacker from "
        "starving the honest sessions (this shows that starvation)",
    )
    p.add_argument("--max-streams", type=int, default=32, help="edge flag (its default: 32)")
    p.add_argument(
        "--max-streams-per-client",
        type=int,
        default=12,
        help="edge flag (its default: 0 = off); the honest devices need 8",
    )
    p.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=8,
        help="edge flag (its default: 0 = off); the honest devices need 8 of the edge's 16",
    )
    p.add_argument("--edge-args", default="", help="more edge-server flags, e.g. '--max-sessions 24'")
    p.add_argument("--silent", type=int, default=48, help="attacker streams that never send a message")
    p.add_argument("--open-only", type=int, default=16, help="attacker streams that send Open, then nothing")
    p.add_argument("--flood", type=int, default=2, help="attacker loops sending maximal Opens back to back")
    p.add_argument("--poison", type=int, default=2, help="attacker loops sending NaN / huge Step frames")
    p.add_argument(
        "--attack-reopen-seconds",
        type=float,
        default=0.0,
        help="attacker pause before reopening a stream the edge ended",
    )
    p.add_argument(
        "--attack-retry-seconds", type=float, default=0.25, help="attacker pause after a RESOURCE_EXHAUSTED refusal"
    )
    p.add_argument("--attack-lead-seconds", type=float, default=3.0, help="attack runs this long before honest load")
    p.add_argument("--min-attack-seconds", type=float, default=15.0)
    p.add_argument("--max-attack-seconds", type=float, default=150.0)
    p.add_argument(
        "--busy-wait-seconds",
        type=float,
        default=60.0,
        help="the honest device's retry budget for a full edge (agent default: 10)",
    )
    args = p.parse_args()
    out_json = Path(args.out)

    import secrets

    from coinfer.tools.launcher import start_edge

    # one random bearer token per client identity (throwaway, this run only; shown as <name> in the output)
    tokens = {} if args.no_tokens else {name: secrets.token_urlsafe(16) for name in IDENTITIES}
    auth = ["--auth-tokens", ",".join(tokens.values())] if tokens else []
    edge_flags = [
        "--torch-threads",
        "1",
        "--prefix-reuse",
        "false",
        "--first-message-seconds",
        str(args.first_message_seconds),
        "--stream-idle-seconds",
        str(args.stream_idle_seconds),
        "--max-streams",
        str(args.max_streams),
        "--max-streams-per-client",
        str(args.max_streams_per_client),
        "--max-sessions-per-client",
        str(args.max_sessions_per_client),
        *shlex.split(args.edge_args),
    ]
    shown_flags = (["--auth-tokens", ",".join(f"<{name}>" for name in tokens)] if tokens else []) + edge_flags
    print(
        f"edge flags: {' '.join(shown_flags)}"
        + ("" if tokens else "  (no tokens: honest devices and attacker share one client identity)"),
        flush=True,
    )
    print(
        f"edge env: COINFER_MALLOC_ARENAS={os.environ.get('COINFER_MALLOC_ARENAS', '(unset: edge default)')}",
        flush=True,
    )
    ops_headers = {"Authorization": f"Bearer {tokens['monitor']}"} if tokens else {}
    edge = start_edge(args.model, args=auth + edge_flags)
    watch = attacker = engine = None
    try:
        addr, ops, pid = edge.ready["grpc"], edge.ready["ops"], int(edge.ready["pid"])
        assert addr.rsplit(":", 1)[0] == LOOPBACK
        with grpc.insecure_channel(addr) as ch:
            d = edge_pb2_grpc.EdgeInferenceStub(ch).Describe(
                pb.DescribeRequest(), timeout=30, metadata=bearer_md(tokens.get("monitor"))
            )
        t0 = time.monotonic()
        watch = Watch(addr, pid, t0, tokens.get("monitor"))
        watch.start()
        engine = build_engine(args, addr, tokens.get("honest"))
        ids_list = prompts(engine)
        # warm-up (not counted): each split once
        for k in (0, K_SPLIT):
            one_session(engine, ids_list[0], k, 4, t0)

        print(f"quiet run: {len(HONEST_SPLITS)} honest sessions, {args.new_tokens} tokens each ...", flush=True)
        q0 = time.monotonic() - t0
        quiet = honest_run(engine, ids_list, args.new_tokens, t0)
        q1 = time.monotonic() - t0
        time.sleep(1.0)
        rss_before = rss_mib(pid)
        outcomes_before = edge_outcomes(ops, ops_headers)

        print("attacked run ...", flush=True)
        ctx = mp.get_context("spawn")
        stop, box = ctx.Event(), ctx.Queue()
        cfg = {
            "grpc": addr,
            "token": tokens.get("attacker"),
            "fp": d.fingerprint,
            "max_message_bytes": d.limits.max_message_bytes,
            "vocab": d.vocab_size,
            "silent": args.silent,
            "open_only": args.open_only,
            "flood": args.flood,
            "poison": args.poison,
            "reopen_seconds": args.attack_reopen_seconds,
            "retry_seconds": args.attack_retry_seconds,
            "max_seconds": args.max_attack_seconds,
            "max_cycles": 100_000,
            **poison_frames(d.hidden_size),
        }
        attacker = ctx.Process(target=attacker_main, args=(cfg, stop, box), name="attacker", daemon=True)
        attacker.start()
        hello = box.get(timeout=120)  # the attacker has built its maximal Opens
        if "error" in hello:
            raise RuntimeError(hello["error"])
        a0 = time.monotonic() - t0
        time.sleep(args.attack_lead_seconds)
        dev_before = device_counters(engine)
        attacked = honest_run(engine, ids_list, args.new_tokens, t0)
        device = counters_delta(dev_before, device_counters(engine))
        while time.monotonic() - t0 < a0 + args.min_attack_seconds:
            time.sleep(0.1)
        stop.set()
        a1 = time.monotonic() - t0
        try:
            report = box.get(timeout=60)
        except queue.Empty:
            report = {"error": "the attacker sent no report"}
        attacker.join(timeout=20)
        # every attacker stream gone: wait for the edge to free its sessions, then settle
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if not httpx.get(ops + "/v1/sessions", headers=ops_headers, timeout=5).json()["sessions"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        time.sleep(2.0)
        rss_after = rss_mib(pid)
        outcomes_after = edge_outcomes(ops, ops_headers)
        watch.stop()
        end = time.monotonic() - t0
    finally:
        try:
            if attacker is not None and attacker.is_alive():
                attacker.terminate()  # our own child, by its handle
                attacker.join(timeout=10)
            if watch is not None:
                watch.stop()
            if engine is not None:
                engine.planner.stop()
        finally:
            edge.stop()  # whatever failed above, the edge process does not outlive us
    summarize(
        args,
        shown_flags,
        sorted(tokens),
        quiet,
        attacked,
        watch,
        report,
        device,
        outcomes_before,
        outcomes_after,
        rss_before,
        rss_after,
        (q0, q1, a0, a1, end),
        out_json,
    )


def summarize(
    args,
    edge_flags: list[str],
    identities: list[str],
    quiet: list[dict],
    attacked: list[dict],
    watch: Watch,
    report: dict,
    device: dict,
    outcomes_before: dict,
    outcomes_after: dict,
    rss_before: float,
    rss_after: float,
    times: tuple[float, ...],
    out_json: Path,
) -> None:
    """The table, the PASS/FAIL lines, the JSON and the PNG."""
    q0, q1, a0, a1, end = times
    rows = []
    for i, (qs, at) in enumerate(zip(quiet, attacked, strict=True)):
        rows.append(
            {
                "session": i,
                "split": qs["split"],
                "identical": at["error"] is None and at["tokens"] == qs["tokens"],
                "quiet": {k: v for k, v in qs.items() if k != "arrivals"},
                "attacked": {k: v for k, v in at.items() if k != "arrivals"},
            }
        )
    peak = max((s["rss_mib"] for s in watch.samples if a0 <= s["t"] <= a1 + 5), default=rss_before)
    qstat, astat = itl_stats(quiet), itl_stats(attacked)
    hq, ha = watch.span(q0, q1), watch.span(a0, a1)
    hall = watch.span(0, end)
    delta = {
        k: outcomes_after.get(k, 0) - outcomes_before.get(k, 0)
        for k in outcomes_after
        if outcomes_after.get(k, 0) != outcomes_before.get(k, 0)
    }
    growth = rss_after / rss_before - 1 if rss_before else float("nan")
    checks = {
        "identical_output": all(r["identical"] for r in rows),
        "itl_p99_within_2x": astat["itl_p99_ms"] <= 2 * qstat["itl_p99_ms"],
        "rss_growth_within_10pct": growth <= 0.10,
        "health_and_describe_answered": hall["failures"] == 0
        and max(ha["health_max_ms"], ha["describe_max_ms"]) < 1000 * HEALTH_TARGET_S,
    }
    result = {
        "benchmark": "hostile_load",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "model": str(args.model),
        "new_tokens": args.new_tokens,
        "codec": args.codec,
        "edge_flags": edge_flags,
        "edge_env": {"COINFER_MALLOC_ARENAS": os.environ.get("COINFER_MALLOC_ARENAS")},
        "client_identities": (
            {
                "tokens": identities,
                "honest": "token <honest> (AgentSettings.edge_token)",
                "attacker": "token <attacker> in every call's metadata",
                "monitor": "token <monitor>: health / Describe / metrics polling",
            }
            if identities
            else {
                "tokens": [],
                "all": "no tokens: one identity (the loopback address) for honest devices, attacker and monitor",
            }
        ),
        "honest_splits": list(HONEST_SPLITS),
        "attacker": {
            "silent": args.silent,
            "open_only": args.open_only,
            "flood_loops": args.flood,
            "poison_loops": args.poison,
            "reopen_seconds": args.attack_reopen_seconds,
            "retry_seconds": args.attack_retry_seconds,
            "lead_seconds": args.attack_lead_seconds,
            "busy_wait_seconds_of_honest_device": args.busy_wait_seconds,
            **report,
        },
        "attack": {"start_s": a0, "end_s": a1, "seconds": a1 - a0},
        "quiet": qstat,
        "attacked": astat,
        "health": {"quiet": hq, "attack": ha, "whole_run": hall},
        "rss": {
            "before_attack_mib": rss_before,
            "peak_attack_mib": peak,
            "after_attack_mib": rss_after,
            "growth": growth,
            "peak_growth": peak / rss_before - 1 if rss_before else float("nan"),
        },
        "timeline": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in smp.items()} for smp in watch.samples[::5]
        ],  # every ~0.5 s
        "edge_outcomes_during_attack": delta,
        "honest_device_during_attack": device,
        "checks": checks,
        "sessions": rows,
    }

    # ------------------------------------------------------------------ table
    print(
        f"\nhostile load on {os.cpu_count()} CPUs (loopback, one edge process, attacker in its own process); "
        f"edge flags: {' '.join(edge_flags)}"
        + (
            f" (client identities: {', '.join(identities)})"
            if identities
            else " (no tokens: honest devices and attacker are one client identity)"
        )
    )
    print(
        f"attacker: {args.silent} silent, {args.open_only} Open-only, {args.flood} maximal-Open flood, "
        f"{args.poison} NaN/huge-frame loops for {a1 - a0:.0f} s "
        f"(honest sessions started {args.attack_lead_seconds:.0f} s in)"
    )
    print(
        f"{'#':>2}{'k':>4}{'TTFT quiet s':>14}{'TTFT attack s':>15}{'busy retries':>14}{'replays':>9}"
        f"{'ITL p99 quiet ms':>18}{'attack ms':>11}  output"
    )
    for r in rows:
        q, a = r["quiet"], r["attacked"]
        ttft_a = f"{a['ttft_s']:.2f}" if a["ttft_s"] is not None else "-"
        status = (
            "identical"
            if r["identical"]
            else (f"FAILED: {a['error'][:60]}" if a["error"] else f"DIFFERS ({len(a['tokens'])} tokens)")
        )
        if a.get("local_fallback"):
            status += " (finished on the device)"
        print(
            f"{r['session']:>2}{r['split']:>4}{q['ttft_s'] or float('nan'):>14.2f}{ttft_a:>15}"
            f"{a.get('busy_retries', '-'):>14}{a.get('replays', '-'):>9}"
            f"{1000 * pct(q['itl_s'], 99):>18.0f}{1000 * pct(a['itl_s'], 99):>11.0f}  {status}"
        )
    print(
        f"all honest gaps: ITL p50 / p99 / max  quiet {qstat['itl_p50_ms']:.0f} / {qstat['itl_p99_ms']:.0f} / "
        f"{qstat['itl_max_ms']:.0f} ms, attacked {astat['itl_p50_ms']:.0f} / {astat['itl_p99_ms']:.0f} / "
        f"{astat['itl_max_ms']:.0f} ms (honest sessions decoding at once, mean over gaps: quiet "
        f"{qstat['honest_decoding_at_once_mean']:.1f}, attacked {astat['honest_decoding_at_once_mean']:.1f}); "
        f"TTFT median quiet {qstat['ttft_median_s']:.2f} s, attacked {astat['ttft_median_s']:.2f} s "
        f"(max {astat['ttft_max_s']:.2f} s)"
    )
    print(
        f"health / Describe: quiet max {hq['health_max_ms']:.0f} / {hq['describe_max_ms']:.0f} ms; attack max "
        f"{ha['health_max_ms']:.0f} / {ha['describe_max_ms']:.0f} ms (p99 {ha['health_p99_ms']:.0f} / "
        f"{ha['describe_p99_ms']:.0f}), {ha['polls']} polls, longest gap {ha['longest_poll_gap_ms']:.0f} ms; "
        f"failures {hall['failures']} {hall['failure_examples'][:2] if hall['failures'] else ''}"
    )
    print(
        f"edge RSS: {rss_before:.0f} MiB before the attack, peak {peak:.0f} ({result['rss']['peak_growth']:+.1%}), "
        f"{rss_after:.0f} MiB after it ({growth:+.1%})"
    )
    if "tally" in report:
        print(
            f"{'attack':>22}{'streams':>9}{'opened':>8}{'ended by edge':>15}{'held med s':>12}{'held max s':>12}  codes"
        )
        for name, t in sorted(report["tally"].items()):
            print(
                f"{name:>22}{t['streams']:>9}{t['opened']:>8}{t['held_by_edge']:>15}{t['held_median_s']:>12.2f}"
                f"{t['held_max_s']:>12.2f}  {t['codes']}"
            )
        print(
            f"flood: {report['flood']['bytes_sent'] / 2**20:.0f} MiB of maximal Opens (sizes "
            f"{report['flood']['sizes']}); poison: {report['poison']['frames_sent']} bad Step frames sent, "
            f"{report['poison']['tokens_back']} tokens back to poisoned sessions"
        )
    else:
        print(f"attacker: {report}")
    print(f"edge session outcomes during the attack: {delta}")
    print(f"honest device during the attack: {device}")
    print(
        f"{'PASS' if checks['identical_output'] else 'FAIL'}  every honest session finishes with the quiet "
        f"run's output ({sum(r['identical'] for r in rows)}/{len(rows)})"
    )
    print(
        f"{'PASS' if checks['itl_p99_within_2x'] else 'FAIL'}  honest p99 ITL {astat['itl_p99_ms']:.0f} ms <= 2x "
        f"quiet {qstat['itl_p99_ms']:.0f} ms (with {astat['honest_decoding_at_once_mean']:.1f} vs "
        f"{qstat['honest_decoding_at_once_mean']:.1f} honest sessions decoding at once)"
    )
    print(f"{'PASS' if checks['rss_growth_within_10pct'] else 'FAIL'}  edge RSS growth {growth:+.1%} <= +10%")
    print(
        f"{'PASS' if checks['health_and_describe_answered'] else 'FAIL'}  health and Describe answered throughout "
        f"({hall['failures']} failures, attack max {max(ha['health_max_ms'], ha['describe_max_ms']):.0f} ms "
        f"< {1000 * HEALTH_TARGET_S:.0f} ms)"
    )
    write_results(out_json, result, lambda png: plot(result, quiet, attacked, watch.samples, png), default=str)


if __name__ == "__main__":
    main()
