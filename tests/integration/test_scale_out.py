"""Scale-out behind the committed proxy configs (deploy/nginx, deploy/haproxy): 3 real edge
processes on loopback, one device agent that knows only the proxy's address (SmolLM2).

12 concurrent streamed chat completions (splits 0 and 15) per phase:
1. no fault: the reference texts, and where each session ran;
2. the proxy restarts mid-stream: every session resumes on its own replica (sticky on
   x-session-id), no replay, same texts;
3. kill -9 of one replica mid-stream: only its sessions replay (on another replica), the other
   replicas' sessions are untouched, same texts.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from coinfer.tools.launcher import start_agent, start_edge
from coinfer.tools.proxies import Proxy, ProxyMissing
from tests.support.processes import ONE_THREAD

pytestmark = pytest.mark.integration
N, TOKENS = 12, 64
TOPICS = [
    "a lighthouse",
    "a desert",
    "the ocean",
    "a library",
    "a forest",
    "a train station",
    "a mountain",
    "a market",
    "a river",
    "a garden",
    "a harbor",
    "a castle",
]


def _body(i: int) -> dict:
    return {
        "model": "smollm2-135m-instruct",
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "codec": "f32",
        "split": 0 if i % 2 == 0 else 15,
        "messages": [{"role": "user", "content": f"Describe {TOPICS[i]} in four sentences."}],
    }


def _stream(base: str, i: int, out: dict, progress: list[int]) -> None:
    text, stats = [], {}
    with httpx.Client(base_url=base, timeout=300) as c, c.stream("POST", "/v1/chat/completions", json=_body(i)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("coinfer"):
                stats = chunk["coinfer"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text.append(chunk["choices"][0]["delta"]["content"])
                progress[i] += 1
    out[i] = ("".join(text), stats)


def _run(base: str, at_progress: int | None = None, fault=None) -> dict:
    """All N requests at once; `fault()` runs once every stream has `at_progress` chunks."""
    out, progress = {}, [0] * N
    threads = [threading.Thread(target=_stream, args=(base, i, out, progress)) for i in range(N)]
    for t in threads:
        t.start()
    if fault is not None:
        deadline = time.monotonic() + 120
        while min(progress) < at_progress and time.monotonic() < deadline:
            time.sleep(0.01)
        assert min(progress) >= at_progress and max(progress) < TOKENS - 4, progress
        fault()
    for t in threads:
        t.join(300)
    assert len(out) == N, f"{N - len(out)} requests failed"
    return out


def _metrics(edge) -> dict[str, float]:
    out = {}
    for line in httpx.get(edge.ready["ops"] + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _opened(edge) -> tuple[float, float, float]:
    m = _metrics(edge)
    return (
        m.get('coinfer_sessions_opened_total{how="new"}', 0.0),
        m.get('coinfer_sessions_opened_total{how="resumed"}', 0.0),
        m.get("coinfer_session_misses_total", 0.0),
    )


def _live(edge) -> list[dict]:
    return httpx.get(edge.ready["ops"] + "/v1/sessions", timeout=10).json()["sessions"]


@contextmanager
def _tier(model_dir, kind: str):
    """3 edge processes behind the proxy, a device agent that knows only the proxy:
    (agent URL, edges, replica addresses, the proxies started so far: a test may restart it)."""
    edges = [start_edge(model_dir, args=list(ONE_THREAD)) for _ in range(3)]
    replicas = [(e.ready["grpc"], e.ready["ops"]) for e in edges]
    proxies, agent = [], None
    try:
        try:
            proxies.append(Proxy(kind, replicas))
        except ProxyMissing as e:
            pytest.fail(f"{e}: `make test` installs it as root; the scale-out tests cannot run without it")
        agent = start_agent(model_dir, proxies[0].address, args=["--replays", "3", *ONE_THREAD])
        yield agent.ready["http"], edges, replicas, proxies
    finally:
        if agent is not None:
            agent.stop()
        for p in proxies:
            p.stop()
        for e in edges:
            e.stop()


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_sessions_stick_to_replicas_and_only_a_dead_replicas_sessions_replay(real_model_dir, kind):
    with _tier(real_model_dir, kind) as (base, edges, replicas, proxies):
        clean = _run(base)
        assert all(stats["replays"] == 0 and stats["resumes"] == 0 for _, stats in clean.values())
        spread = [_opened(e)[0] for e in edges]
        assert sum(spread) == N and sum(1 for n in spread if n) >= 2, spread  # the hash spreads sessions

        # 2. the proxy restarts: every stream breaks, every session resumes where it ran

        def restart_proxy() -> None:
            port = proxies[-1].port
            proxies[-1].stop()
            proxies.append(Proxy(kind, replicas, port=port))

        before = [_opened(e) for e in edges]
        again = _run(base, 6, restart_proxy)
        after = [_opened(e) for e in edges]
        assert {i: t for i, (t, _) in again.items()} == {i: t for i, (t, _) in clean.items()}
        resumes = sum(s["resumes"] for _, s in again.values())
        assert sum(s["replays"] for _, s in again.values()) == 0
        # every split-15 session broke (its edge waits for the device each step); a split-0 session
        # whose edge had already sent all its tokens did not
        assert resumes >= sum(1 for i in range(N) if _body(i)["split"]), resumes
        assert sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) == resumes
        assert sum(a[2] for a in after) == 0  # no resume ever landed on a replica without its session

        # 3. kill -9 the replica with the most split-15 sessions (those cannot finish without their
        #    device; a split-0 session may have sent all its tokens already) mid-stream
        victim: dict = {}

        def kill_one() -> None:
            live = [_live(e) for e in edges]
            i = max(range(3), key=lambda j: sum(x["split"] == 15 for x in live[j]))
            victim.update(
                index=i, live=len(live[i]), stuck=sum(x["split"] == 15 for x in live[i]), opened=_opened(edges[i])[0]
            )
            edges[i].kill()

        before = [_opened(e) for e in edges]
        third = _run(base, 6, kill_one)
        assert {i: t for i, (t, _) in third.items()} == {i: t for i, (t, _) in clean.items()}
        replays = [s["replays"] for _, s in third.values()]
        k15_replays = sum(s["replays"] for _, s in third.values() if s["split"] == 15)
        assert victim["stuck"] > 0 and k15_replays == victim["stuck"], (victim, replays)
        assert max(replays) == 1 and sum(replays) <= victim["live"], (victim, replays)  # only the dead one's
        assert sum(s["resumes"] for _, s in third.values()) == 0
        survivors = [j for j in range(3) if j != victim["index"]]
        after = {j: _opened(edges[j]) for j in survivors}
        # each replay: one miss (the resume), then a new session on a survivor; the survivors' own
        # sessions never moved or resumed
        on_victim = victim["opened"] - before[victim["index"]][0]
        assert sum(after[j][2] - before[j][2] for j in survivors) == sum(replays)
        assert sum(after[j][0] - before[j][0] for j in survivors) == N - on_victim + sum(replays)
        assert all(after[j][1] == before[j][1] for j in survivors)


def test_a_conversation_stays_on_the_replica_that_kept_its_prefix(real_model_dir):
    """The app's `user` (or header X-Session-Id) is the affinity key: every turn of a conversation
    lands on one replica, so the next turn reuses the prefix that replica kept."""
    with _tier(real_model_dir, "nginx") as (base, edges, _, _):
        used = set()
        with httpx.Client(base_url=base, timeout=300) as c:
            for i in range(6):
                messages = [{"role": "user", "content": f"Describe {TOPICS[i]} in two sentences."}]
                body = {
                    "model": "smollm2-135m-instruct",
                    "max_tokens": 24,
                    "temperature": 0,
                    "codec": "f32",
                    "split": 15,
                    "messages": messages,
                }
                one = c.post("/v1/chat/completions", json={**body, "user": f"user-{i}"}).json()
                messages += [one["choices"][0]["message"], {"role": "user", "content": "And at night?"}]
                two = c.post(
                    "/v1/chat/completions", json={**body, "messages": messages}, headers={"X-Session-Id": f"user-{i}"}
                ).json()
                assert two["coinfer"]["edge_replica"] == one["coinfer"]["edge_replica"]
                assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
                used.add(one["coinfer"]["edge_replica"])
        assert len(used) >= 2  # conversations still spread over the replicas
