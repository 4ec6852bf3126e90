"""What the hostile-load modules share: the scenario's constants, bearer metadata, the edge's RSS
and percentiles."""

from __future__ import annotations

from pathlib import Path

from coinfer import wire

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
