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

import multiprocessing as mp
import os
import queue
import secrets
import shlex
import time
from pathlib import Path

import grpc
from _common import RESULTS, parser
from hostile.attacker import attack_config, attacker_main
from hostile.common import HONEST_SPLITS, IDENTITIES, K_SPLIT, LOOPBACK, bearer_md, rss_mib
from hostile.honest import build_engine, counters_delta, device_counters, honest_run, one_session, prompts
from hostile.report import Run, summarize
from hostile.watch import Watch, edge_outcomes, wait_sessions_freed

from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc


# ---------------------------------------------------------------------------------------- command line
def parse_args():
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS / "hostile_load.json"), help="JSON path; the PNG goes next to it")
    p.add_argument("--codec", default="f16", help="codec of the honest k = 15 sessions")
    add_edge_args(p)
    add_attack_args(p)
    return p.parse_args()


def add_edge_args(p) -> None:
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


def add_attack_args(p) -> None:
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


def edge_flags(args) -> list[str]:
    """The edge's flags but its tokens: short deadlines, torch threads, stream and per-client limits."""
    return [
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


# ---------------------------------------------------------------------------------------- the phases
class Phases:
    """One run against a started edge: warm-up, the quiet run, the attacked run, the settling after it.
    Holds what it starts (the watcher, the honest engine, the attacker process) and stops it in close()."""

    def __init__(self, args, edge, tokens: dict[str, str], ops_headers: dict[str, str]) -> None:
        self.args, self.edge, self.tokens, self.ops_headers = args, edge, tokens, ops_headers
        self.watch: Watch | None = None
        self.attacker = None
        self.engine = None

    def run(self) -> Run:
        try:
            describe = self.connect()
            quiet, q0, q1 = self.quiet_run()
            rss_before, outcomes_before = rss_mib(self.pid), edge_outcomes(self.ops, self.ops_headers)
            attacked, device, report, a0, a1 = self.attacked_run(describe)
            rss_after, outcomes_after, end = self.settle()
        finally:
            self.close()
        assert self.watch is not None
        return Run(
            quiet,
            attacked,
            self.watch,
            report,
            device,
            outcomes_before,
            outcomes_after,
            rss_before,
            rss_after,
            (q0, q1, a0, a1, end),
        )

    def connect(self) -> pb.DescribeResponse:
        """Describe the edge, start the watcher and the honest device, warm up each split once."""
        ready = self.edge.ready
        self.addr, self.ops, self.pid = ready["grpc"], ready["ops"], int(ready["pid"])
        assert self.addr.rsplit(":", 1)[0] == LOOPBACK
        with grpc.insecure_channel(self.addr) as ch:
            describe = edge_pb2_grpc.EdgeInferenceStub(ch).Describe(
                pb.DescribeRequest(), timeout=30, metadata=bearer_md(self.tokens.get("monitor"))
            )
        self.t0 = time.monotonic()
        self.watch = Watch(self.addr, self.pid, self.t0, self.tokens.get("monitor"))
        self.watch.start()
        self.engine = build_engine(self.args, self.addr, self.tokens.get("honest"))
        self.ids_list = prompts(self.engine)
        # warm-up (not counted): each split once
        for k in (0, K_SPLIT):
            one_session(self.engine, self.ids_list[0], k, 4, self.t0)
        return describe

    def since_t0(self) -> float:
        return time.monotonic() - self.t0

    def quiet_run(self) -> tuple[list[dict], float, float]:
        print(f"quiet run: {len(HONEST_SPLITS)} honest sessions, {self.args.new_tokens} tokens each ...", flush=True)
        q0 = self.since_t0()
        quiet = honest_run(self.engine, self.ids_list, self.args.new_tokens, self.t0)
        q1 = self.since_t0()
        time.sleep(1.0)
        return quiet, q0, q1

    def attacked_run(self, describe: pb.DescribeResponse) -> tuple[list[dict], dict, dict, float, float]:
        """Start the attacker, the honest sessions `--attack-lead-seconds` later, stop the attacker when
        they are done (at least `--min-attack-seconds` after it started), and take its report."""
        args = self.args
        print("attacked run ...", flush=True)
        ctx = mp.get_context("spawn")  # the child imports hostile.attacker through the sys.path spawn hands it
        stop, box = ctx.Event(), ctx.Queue()
        cfg = attack_config(args, self.addr, self.tokens.get("attacker"), describe)
        self.attacker = ctx.Process(target=attacker_main, args=(cfg, stop, box), name="attacker", daemon=True)
        self.attacker.start()
        hello = box.get(timeout=120)  # the attacker has built its maximal Opens
        if "error" in hello:
            raise RuntimeError(hello["error"])
        a0 = self.since_t0()
        time.sleep(args.attack_lead_seconds)
        dev_before = device_counters(self.engine)
        attacked = honest_run(self.engine, self.ids_list, args.new_tokens, self.t0)
        device = counters_delta(dev_before, device_counters(self.engine))
        while self.since_t0() < a0 + args.min_attack_seconds:
            time.sleep(0.1)
        stop.set()
        a1 = self.since_t0()
        try:
            report = box.get(timeout=60)
        except queue.Empty:
            report = {"error": "the attacker sent no report"}
        self.attacker.join(timeout=20)
        return attacked, device, report, a0, a1

    def settle(self) -> tuple[float, dict, float]:
        """Every attacker stream gone: wait for the edge to free its sessions, settle, measure, stop watching."""
        wait_sessions_freed(self.ops, self.ops_headers)
        time.sleep(2.0)
        rss_after = rss_mib(self.pid)
        outcomes_after = edge_outcomes(self.ops, self.ops_headers)
        assert self.watch is not None
        self.watch.stop()
        return rss_after, outcomes_after, self.since_t0()

    def close(self) -> None:
        try:
            if self.attacker is not None and self.attacker.is_alive():
                self.attacker.terminate()  # our own child, by its handle
                self.attacker.join(timeout=10)
            if self.watch is not None:
                self.watch.stop()
            if self.engine is not None:
                self.engine.planner.stop()
        finally:
            self.edge.stop()  # whatever failed above, the edge process does not outlive us


def main() -> None:
    args = parse_args()

    from coinfer.tools.launcher import start_edge

    # one random bearer token per client identity (throwaway, this run only; shown as <name> in the output)
    tokens = {} if args.no_tokens else {name: secrets.token_urlsafe(16) for name in IDENTITIES}
    auth = ["--auth-tokens", ",".join(tokens.values())] if tokens else []
    flags = edge_flags(args)
    shown_flags = (["--auth-tokens", ",".join(f"<{name}>" for name in tokens)] if tokens else []) + flags
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
    edge = start_edge(args.model, args=auth + flags)
    run = Phases(args, edge, tokens, ops_headers).run()
    summarize(args, shown_flags, sorted(tokens), run, Path(args.out))


if __name__ == "__main__":
    main()
