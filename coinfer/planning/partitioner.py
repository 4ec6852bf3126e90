"""The bandwidth-aware partitioner: pure functions from numbers to a Plan (split k, codec).

Cost of a cut k for a T-token prompt and M new tokens (docs/design.md, "Cost model"):

  k = N   device only:  TTFT = embed + device prefill[0:N](T) + head
                        per token = embed + device decode[0:N] + head
  k = 0   token ids:    TTFT = 2 RTT (open, prefill) + ids up + queue + edge prefill[0:N](T) + head + token down
                        per token = queue + edge decode[0:N] + head   (the edge streams: no round trip)
  0<k<N   hidden states: TTFT = 2 RTT + device prefill[0:k](T) + frame(T) up + queue + edge prefill[k:N](T)
                               + head + token down
                        per token = device decode[0:k] + frame(1) up + RTT + queue + edge decode[k:N]
                               + head + token down
  total = TTFT + (M - 1) * per token

`queue` is the edge's recent wait per work item (its load). Objectives: latency (total
seconds), device energy (compute watts x device time + idle watts x waiting + radio joules
per byte), or latency + weight x energy. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from coinfer import wire
from coinfer.planning.cost_profile import CostProfile

TOKEN_MESSAGE_BYTES = 56  # one Token reply on the wire: protobuf + gRPC + HTTP/2 framing
OPEN_MESSAGE_BYTES = 120  # Open + its reply
ID_BYTES = 3  # a token id as a protobuf varint (vocabularies < 2**21)
OBJECTIVES = ("latency", "energy", "weighted")


class PlanError(ValueError):
    """No cut satisfies the constraints (e.g. privacy floor above what the device holds)."""


@dataclass(frozen=True)
class LinkEstimate:
    up_bytes_per_second: float
    down_bytes_per_second: float
    rtt_seconds: float


@dataclass(frozen=True)
class EdgeView:
    """What the device knows of an edge: its cost profile and its current wait per work item."""

    profile: CostProfile
    queue_seconds: float = 0.0


@dataclass(frozen=True)
class Constraints:
    min_device_layers: int = 0  # privacy floor: raw tokens and the first layers stay on the device
    max_device_layers: int | None = None  # memory cap (None: what the device profile holds)
    codecs: tuple[str, ...] = ("f16",)  # codecs the plan may use for hidden states
    min_agreement: float = 0.0  # accuracy budget: a lossy (cut, codec) needs this greedy agreement
    agreement: Mapping[str, Mapping[int, float]] | None = None  # calibrated: codec -> cut -> agreement

    def accurate_enough(self, codec: str, k: int) -> bool:
        """f32 always; a lossy codec only where the calibrated table puts it at or above the budget."""
        if codec == "f32" or self.min_agreement <= 0:
            return True
        measured = (self.agreement or {}).get(codec, {}).get(k)
        return measured is not None and measured >= self.min_agreement


@dataclass(frozen=True)
class Objective:
    kind: str = "latency"  # latency | energy | weighted
    energy_weight: float = 1.0  # weighted: seconds of latency one joule is worth
    compute_watts: float = 2.0  # device power while computing
    idle_watts: float = 0.3  # device power while waiting on the link or the edge
    tx_joules_per_byte: float = 1e-6  # radio energy per byte sent
    rx_joules_per_byte: float = 5e-7  # radio energy per byte received


@dataclass
class Candidate:
    split: int
    codec: str  # wire.NO_EDGE at k = N, wire.TOKEN_IDS at k = 0
    ttft: float
    per_token: float
    total: float
    energy: float
    bytes_up: float
    bytes_down: float
    breakdown: dict[str, float]  # seconds over the whole request per term
    score: float = 0.0

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "codec": self.codec,
            "ttft_seconds": self.ttft,
            "per_token_seconds": self.per_token,
            "total_seconds": self.total,
            "energy_joules": self.energy,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "breakdown_seconds": self.breakdown,
            "score": self.score,
        }


@dataclass
class Plan:
    best: Candidate
    reason: str
    objective: str
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def split(self) -> int:
        return self.best.split

    @property
    def codec(self) -> str:
        return self.best.codec

    def per_split(self) -> dict[int, Candidate]:
        """Each split's best candidate (its best codec), by split."""
        best: dict[int, Candidate] = {}
        for c in self.candidates:  # ranked best first
            best.setdefault(c.split, c)
        return dict(sorted(best.items()))

    def to_dict(self) -> dict:
        return {
            **self.best.to_dict(),
            "objective": self.objective,
            "reason": self.reason,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _terms(
    device: CostProfile, edge: EdgeView | None, link: LinkEstimate, k: int, codec: str, tokens: int
) -> tuple[dict[str, float], float, float]:
    """Seconds per term, bytes up and bytes down for one forward of `tokens` tokens at cut k."""
    n = device.num_layers
    t = {"device_compute": 0.0, "uplink": 0.0, "rtt": 0.0, "edge_queue": 0.0, "edge_compute": 0.0, "downlink": 0.0}
    up = down = 0.0
    if k > 0:
        t["device_compute"] = device.embed + (device.prefill(0, k, tokens) if tokens > 1 else device.decode(0, k))
    if k == n:
        t["device_compute"] += device.head
        return t, up, down
    if edge is None:
        raise ValueError(f"cut {k} leaves layers [{k}, {n}) to the edge: it needs the edge's view")
    e = edge.profile
    up = tokens * ID_BYTES + 16 if k == 0 else device.frame_bytes(k, codec, tokens)
    down = TOKEN_MESSAGE_BYTES
    t["uplink"] = up / link.up_bytes_per_second
    t["downlink"] = down / link.down_bytes_per_second
    t["rtt"] = link.rtt_seconds
    t["edge_queue"] = edge.queue_seconds
    t["edge_compute"] = (
        (e.embed if k == 0 else 0.0) + e.head + (e.prefill(k, n, tokens) if tokens > 1 else e.decode(k, n))
    )
    return t, up, down


def cost(
    device: CostProfile,
    edge: EdgeView | None,
    link: LinkEstimate,
    k: int,
    codec: str,
    prompt_tokens: int,
    new_tokens: int,
    objective: Objective = Objective(),
) -> Candidate:
    """Predicted latency, energy and bytes of one request at cut k with `codec`."""
    first, up, down = _terms(device, edge, link, k, codec, max(prompt_tokens, 2))
    step, up1, down1 = _terms(device, edge, link, k, codec, 1)
    n_steps = max(new_tokens, 1) - 1
    n = device.num_layers
    if 0 <= k < n:
        first["rtt"] += link.rtt_seconds  # Open waits for Opened before the prefill goes out
        first["uplink"] += OPEN_MESSAGE_BYTES / 2 / link.up_bytes_per_second
        up += OPEN_MESSAGE_BYTES / 2
        down += OPEN_MESSAGE_BYTES / 2
    if k == 0:  # the edge generates alone and streams: no step goes up, tokens pipeline
        step = {
            "device_compute": 0.0,
            "uplink": 0.0,
            "rtt": 0.0,
            "edge_queue": step["edge_queue"],
            "edge_compute": step["edge_compute"],
            "downlink": 0.0,
        }
        up1 = 0.0
    ttft, per_token = sum(first.values()), sum(step.values())
    breakdown = {name: first[name] + n_steps * step[name] for name in first}
    total = ttft + n_steps * per_token
    bytes_up, bytes_down = up + n_steps * up1, down + n_steps * down1
    device_time = breakdown["device_compute"]
    energy = (
        objective.compute_watts * device_time
        + objective.idle_watts * (total - device_time)
        + objective.tx_joules_per_byte * bytes_up
        + objective.rx_joules_per_byte * bytes_down
    )
    label = wire.split_codec(k, n, codec)
    c = Candidate(k, label, ttft, per_token, total, energy, bytes_up, bytes_down, breakdown)
    c.score = score(c, objective)
    return c


def score(c: Candidate, objective: Objective) -> float:
    if objective.kind == "latency":
        return c.total
    if objective.kind == "energy":
        return c.energy
    if objective.kind == "weighted":
        return c.total + objective.energy_weight * c.energy
    raise ValueError(f"unknown objective {objective.kind!r}; choose one of {', '.join(OBJECTIVES)}")


def feasible_splits(device: CostProfile, edge: EdgeView | None, constraints: Constraints) -> list[int]:
    """Cuts the constraints allow: floor <= k <= memory cap, edge holds [k, N) or k = N on the device."""
    n = device.num_layers
    cap = device.stop if constraints.max_device_layers is None else min(constraints.max_device_layers, device.stop)
    device_only = n if device.whole_model and cap >= n else None
    lo = max(constraints.min_device_layers, edge.profile.start if edge is not None else n)
    ks = list(range(lo, min(cap, n - 1) + 1)) if edge is not None else []
    if device_only is not None and device_only >= constraints.min_device_layers:
        ks.append(n)
    return ks


def candidates(
    device: CostProfile,
    edge: EdgeView | None,
    link: LinkEstimate,
    prompt_tokens: int,
    new_tokens: int,
    constraints: Constraints = Constraints(),
    objective: Objective = Objective(),
    cached: Mapping[int, int] | None = None,
) -> list[Candidate]:
    """Every feasible (k, codec) with its cost, best first.

    cached: prompt positions the edge probably still holds at split k from an earlier turn
    (prefix reuse): only the rest is run and sent there.
    """
    n = device.num_layers
    out = []
    for k in feasible_splits(device, edge, constraints):
        fresh = prompt_tokens - (cached or {}).get(k, 0) if k < n else prompt_tokens
        for c in constraints.codecs if 0 < k < n else ("-",):
            if c == "-" or constraints.accurate_enough(c, k):
                out.append(cost(device, edge, link, k, c, fresh, new_tokens, objective))
    return sorted(out, key=lambda c: (c.score, -c.split))


def plan(
    device: CostProfile,
    edge: EdgeView | None,
    link: LinkEstimate,
    prompt_tokens: int,
    new_tokens: int,
    constraints: Constraints = Constraints(),
    objective: Objective = Objective(),
    cached: Mapping[int, int] | None = None,
) -> Plan:
    """The best cut under the constraints for the objective, with the cost of every alternative."""
    ranked = candidates(device, edge, link, prompt_tokens, new_tokens, constraints, objective, cached)
    if not ranked:
        raise PlanError(_infeasible(device, edge, constraints))
    return Plan(ranked[0], reason(ranked, link, edge, objective), objective.kind, ranked)


def _infeasible(device: CostProfile, edge: EdgeView | None, constraints: Constraints) -> str:
    if edge is None:
        return (
            f"no edge is available and the device holds layers [0, {device.stop}) without the whole "
            f"model, so no split is possible"
        )
    budget = (
        f", min_agreement={constraints.min_agreement} for codecs {', '.join(constraints.codecs)}"
        if constraints.min_agreement > 0
        else ""
    )
    return (
        f"no split satisfies min_device_layers={constraints.min_device_layers}, "
        f"max_device_layers={constraints.max_device_layers}{budget}, device layers [0, {device.stop}), "
        f"edge layers [{edge.profile.start}, {edge.profile.stop})"
    )


def describe_split(k: int, n: int) -> str:
    return "device only" if k == n else "edge only, token ids up" if k == 0 else f"{k} layers on the device"


def reason(ranked: list[Candidate], link: LinkEstimate, edge: EdgeView | None, objective: Objective) -> str:
    """One line: the choice, its prediction, the runner-up, and the inputs that decided it."""
    best = ranked[0]
    n = edge.profile.stop if edge is not None else best.split
    unit = "J" if objective.kind == "energy" else "s"
    line = (
        f"{objective.kind}: split {best.split} ({describe_split(best.split, n)}"
        f"{'' if best.codec in wire.PSEUDO_CODECS else ', ' + best.codec}): predicted TTFT "
        f"{best.ttft * 1e3:.0f} ms + {best.per_token * 1e3:.1f} ms/token = {best.total:.2f} s"
    )
    others = [c for c in ranked[1:] if c.split != best.split]
    if others:
        line += f"; next best split {others[0].split} {others[0].score:.2f} {unit}"
    if edge is not None:
        line += (
            f"; link up {format_rate(link.up_bytes_per_second)}, RTT {link.rtt_seconds * 1e3:.0f} ms, "
            f"edge queue {edge.queue_seconds * 1e3:.0f} ms"
        )
    else:
        line += "; no edge"
    return line


def format_rate(bytes_per_second: float) -> str:
    bits = bytes_per_second * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"
