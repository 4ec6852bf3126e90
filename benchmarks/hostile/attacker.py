"""The attacker process (loopback only): silent streams, Open-only streams, a flood of maximal Opens
and poison frames, each kind in its own threads, and the Tally of what the edge did to them."""

from __future__ import annotations

import collections
import queue
import threading
import time

import grpc

from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from hostile.common import GENERATE, K_SPLIT, LOOPBACK, bearer_md, pct
from hostile.payloads import maximal_opens, poison_frames

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 32 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]
AT_STOP = "ended_by_attacker_at_stop"  # the code tallied for a stream the attacker itself ended


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
    Attacker(cfg, stop).run(out)


class Attacker:
    """The attack's shared state (deadline, live calls, counts) and one method per kind of loop."""

    def __init__(self, cfg: dict, stop) -> None:
        self.cfg, self.stop = cfg, stop
        self.t_end = time.monotonic() + cfg["max_seconds"]
        self.md = bearer_md(cfg["token"])  # the attacker's own client identity, on every call
        self.tally, self.live, self.stopping = Tally(), set(), threading.Event()
        self.live_lock = threading.Lock()
        self.flood = {"bytes_sent": 0, "sizes": {}}
        self.poison = {"frames_sent": 0, "tokens_back": 0}
        self.channels = [
            grpc.insecure_channel(cfg["grpc"], options=CHANNEL_OPTIONS + [("coinfer.attacker", i)]) for i in range(6)
        ]

    def run(self, out) -> None:
        """Start every loop, say ready, run until stopped or out of time, end the live calls, report."""
        threads = self._threads()
        out.put({"ready": True, "t": time.monotonic()})
        for t in threads:
            t.start()
        self.stop.wait(max(0.0, self.t_end - time.monotonic()))
        self.stopping.set()
        with self.live_lock:
            calls = list(self.live)
        for c in calls:
            c.cancel()
        for t in threads:
            t.join(timeout=10)
        out.put(
            {
                "tally": self.tally.report(),
                "flood": self.flood,
                "poison": self.poison,
                "threads_still_running": sum(t.is_alive() for t in threads),
            }
        )
        for ch in self.channels:
            ch.close()

    def _threads(self) -> list[threading.Thread]:
        """One thread per silent, Open-only, flood and poison loop (the maximal Opens built first)."""
        cfg, channels = self.cfg, self.channels
        blobs = maximal_opens(cfg["fp"], cfg["max_message_bytes"], cfg["vocab"])
        self.flood["sizes"] = {k: len(v) for k, v in blobs.items()}
        silent_open = pb.DeviceMessage(
            open=pb.Open(session_id="", fingerprint=cfg["fp"], split=K_SPLIT, codec="f16", max_new_tokens=64)
        )
        threads = []
        for i in range(cfg["silent"]):
            threads.append(
                threading.Thread(target=self.held_stream, args=("silent", channels[i % 3], None), daemon=True)
            )
        for i in range(cfg["open_only"]):
            msg = pb.DeviceMessage()
            msg.CopyFrom(silent_open)
            msg.open.session_id = f"open-only-{i}"
            threads.append(threading.Thread(target=self.held_stream, args=("open_only", channels[3], msg), daemon=True))
        for i in range(cfg["flood"]):
            threads.append(threading.Thread(target=self.flood_loop, args=(channels[4], blobs, i), daemon=True))
        for i in range(cfg["poison"]):
            threads.append(threading.Thread(target=self.poison_loop, args=(channels[5], i), daemon=True))
        return threads

    # ------------------------------------------------------------------ shared by the loops
    def running(self) -> bool:
        return not self.stop.is_set() and not self.stopping.is_set() and time.monotonic() < self.t_end

    def rest(self, code: str) -> None:
        self.stop.wait(self.cfg["retry_seconds"] if code == "RESOURCE_EXHAUSTED" else self.cfg["reopen_seconds"])

    def end_code(self, code: str) -> str:
        """The code to tally: the edge's, unless the attacker was stopping (then it ended the call)."""
        return code if not self.stopping.is_set() else AT_STOP

    def _track(self, call) -> None:
        with self.live_lock:
            self.live.add(call)

    def _untrack(self, call) -> None:
        with self.live_lock:
            self.live.discard(call)

    # ------------------------------------------------------------------ silent and Open-only streams
    def held_stream(self, kind: str, ch: grpc.Channel, first: pb.DeviceMessage | None) -> None:
        """Open a stream, send `first` (or nothing), then hold it silent until the edge ends it; again."""
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        for _ in range(self.cfg["max_cycles"]):
            if not self.running():
                return
            code, detail, opened, t0 = self._hold_once(stub, first)
            by_edge = code not in ("RESOURCE_EXHAUSTED",) and not self.stopping.is_set()
            self.tally.add(kind, self.end_code(code), time.monotonic() - t0 if by_edge else None, opened, detail)
            self.rest(code)

    def _hold_once(self, stub, first: pb.DeviceMessage | None) -> tuple[str, str, bool, float]:
        """One held stream: its end code and detail, whether it was Opened, and since when it was held."""
        q: queue.Queue = queue.Queue()
        if first is not None:
            q.put(first)
        t0 = time.monotonic()
        call = stub.Generate(iter(q.get, None), timeout=self.cfg["max_seconds"] + 30, metadata=self.md)
        self._track(call)
        code, detail, opened = "OK", "", False
        try:
            for reply in call:
                if reply.WhichOneof("kind") == "opened":
                    opened, t0 = True, time.monotonic()  # Open-only: held from Opened on
        except grpc.RpcError as e:
            code, detail = e.code().name, e.details() or ""
        finally:
            q.put(None)  # ends the request iterator's thread
            self._untrack(call)
        return code, detail, opened, t0

    # ------------------------------------------------------------------ maximal Opens
    def flood_loop(self, ch: grpc.Channel, blobs: dict[str, bytes], offset: int) -> None:
        """Maximal Opens back to back, each kind in turn (raw bytes: no serializer on our side)."""
        call = ch.stream_stream(GENERATE, request_serializer=None, response_deserializer=pb.EdgeMessage.FromString)
        names = list(blobs)
        for n in range(self.cfg["max_cycles"]):
            if not self.running():
                return
            name = names[(n + offset) % len(names)]
            code, detail = "OK", ""
            try:
                list(call(iter([blobs[name]]), timeout=30, metadata=self.md))
            except grpc.RpcError as e:
                code, detail = e.code().name, e.details() or ""
            with self.tally.lock:
                self.flood["bytes_sent"] += len(blobs[name])
            self.tally.add(f"flood:{name}", code, detail=detail)
            if code == "RESOURCE_EXHAUSTED":
                self.rest(code)

    # ------------------------------------------------------------------ poison frames
    def poison_loop(self, ch: grpc.Channel, idx: int) -> None:
        """Sessions at k = 15 fed NaN Step frames, then huge ones, in turn; each until the edge ends it."""
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        for n in range(self.cfg["max_cycles"]):
            if not self.running():
                return
            kind = "nan" if n % 2 == 0 else "huge"
            frame = self.cfg["nan_frame"] if kind == "nan" else self.cfg["huge_frame"]
            code, detail, opened = self._poison_once(stub, f"poison-{idx}-{n}", frame)
            self.tally.add(f"poison:{kind}", self.end_code(code), opened=opened, detail=detail)
            self.rest(code)

    def _poison_once(self, stub, session_id: str, frame: bytes) -> tuple[str, str, bool]:
        """One poisoned session: Open, a finite prefill, then `frame` as a Step after each token."""
        q: queue.Queue = queue.Queue()
        q.put(
            pb.DeviceMessage(
                open=pb.Open(
                    session_id=session_id, fingerprint=self.cfg["fp"], split=K_SPLIT, codec="f32", max_new_tokens=64
                )
            )
        )
        call = stub.Generate(iter(q.get, None), timeout=60, metadata=self.md)
        self._track(call)
        code, detail, state = "OK", "", {"opened": False, "poisoned": False}
        try:
            for reply in call:
                self._poison_reply(reply, q, frame, state)
        except grpc.RpcError as e:
            code, detail = e.code().name, e.details() or ""
        finally:
            q.put(None)
            self._untrack(call)
        return code, detail, state["opened"]

    def _poison_reply(self, reply: pb.EdgeMessage, q: queue.Queue, frame: bytes, state: dict) -> None:
        """Answer Opened with the prefill and each token with the poison (or end the stream when done)."""
        what = reply.WhichOneof("kind")
        if what == "opened":
            state["opened"] = True
            q.put(pb.DeviceMessage(prefill=pb.Prefill(frame=self.cfg["prefill_frame"])))
        elif what == "token":
            with self.tally.lock:
                self.poison["tokens_back"] += int(state["poisoned"])  # the edge sampled a token from the poison
            if reply.token.finish_reason or not self.running():
                q.put(None)
                return
            with self.tally.lock:
                self.poison["frames_sent"] += 1
            state["poisoned"] = True
            q.put(pb.DeviceMessage(step=pb.Step(frame=frame)))  # the poison, again and again


def attack_config(args, addr: str, token: str | None, describe: pb.DescribeResponse) -> dict:
    """What attacker_main gets: the edge's address and limits, the attack's size and pace (from the
    command line) and the poison frames (built in this process: they need torch, the attacker does not)."""
    return {
        "grpc": addr,
        "token": token,
        "fp": describe.fingerprint,
        "max_message_bytes": describe.limits.max_message_bytes,
        "vocab": describe.vocab_size,
        "silent": args.silent,
        "open_only": args.open_only,
        "flood": args.flood,
        "poison": args.poison,
        "reopen_seconds": args.attack_reopen_seconds,
        "retry_seconds": args.attack_retry_seconds,
        "max_seconds": args.max_attack_seconds,
        "max_cycles": 100_000,
        **poison_frames(describe.hidden_size),
    }
