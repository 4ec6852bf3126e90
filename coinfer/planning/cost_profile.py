"""Per-layer cost profiles: the arithmetic the partitioner prices a cut with.

A `CostProfile` covers the layers [start, stop) one side holds (device: [0, D), edge:
[m, N)) and gives, per layer, prefill seconds as a line in the token count and decode
seconds per token; plus the embedding and norm + lm_head. The device's profile also holds
`wire`: the bytes a hidden-state frame takes after each layer for each codec, so the link is
priced with real frames, not a formula.

Why apart from the measuring (coinfer/profile.py): pricing is plain numbers, so the planner
and every CLI that plans can use it without loading torch or a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

STEP_MESSAGE_OVERHEAD = 20  # protobuf + gRPC + HTTP/2 framing around a Step frame, bytes


@dataclass(frozen=True)
class Line:
    """seconds (or bytes) = fixed + per_token * tokens"""

    fixed: float
    per_token: float

    def __call__(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    @staticmethod
    def fit(xs: list[float], ys: list[float]) -> Line:
        """Least squares; slope and intercept clamped at 0 (costs do not shrink with tokens)."""
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var) if var else 0.0
        return Line(max(0.0, my - slope * mx), slope)


@dataclass
class CostProfile:
    start: int  # first layer covered
    stop: int  # one past the last layer covered
    layer_prefill: list[Line]  # per layer: seconds for a T-token prefill
    layer_decode: list[float]  # per layer: seconds per decode token
    embed: float = 0.0  # one embedding lookup call, s (0 when the side has no embedding)
    head: float = 0.0  # norm + lm_head + sampling for one token, s (0 when no head)
    precision: str = "fp32"
    threads: int = 1
    host: str = ""
    measured_at: float = 0.0
    slowdown: float = 1.0  # device emulation factor already applied to every figure (benchmarks)
    # codec -> per cut k (index k - start - 1, k in (start, stop]): frame bytes = fixed + per_token * T
    wire: dict[str, list[Line]] = field(default_factory=dict)
    num_layers: int = 0  # layers of the whole model (0: stop)

    def __post_init__(self) -> None:
        self.num_layers = self.num_layers or self.stop

    @property
    def whole_model(self) -> bool:
        """Holds every layer and the head: can generate alone."""
        return self.start == 0 and self.stop == self.num_layers and self.head > 0

    # -- pricing ----------------------------------------------------------------------------
    def _layers(self, a: int, b: int) -> range:
        if not self.start <= a <= b <= self.stop:
            raise ValueError(f"layers [{a}, {b}) are not in this profile's [{self.start}, {self.stop})")
        return range(a - self.start, b - self.start)

    def prefill(self, a: int, b: int, tokens: int) -> float:
        """Seconds for layers [a, b) on a `tokens`-long prompt (embedding when a == 0 is added by the caller)."""
        return sum(self.layer_prefill[i](tokens) for i in self._layers(a, b))

    def decode(self, a: int, b: int) -> float:
        """Seconds per decode token for layers [a, b)."""
        return sum(self.layer_decode[i] for i in self._layers(a, b))

    def frame_bytes(self, k: int, codec_name: str, tokens: int) -> float:
        """Bytes of the message carrying the hidden states of `tokens` tokens after layer k."""
        lines = self.wire.get(codec_name)
        if not lines or not self.start < k <= min(self.stop, self.start + len(lines)):
            raise KeyError(f"no wire measurement for codec {codec_name!r} at split {k}")
        return lines[k - self.start - 1](tokens) + STEP_MESSAGE_OVERHEAD

    def slowed(self, factor: float) -> CostProfile:
        """This profile on a device `factor` times slower (benchmark emulation)."""
        f = factor / self.slowdown
        return CostProfile(
            self.start,
            self.stop,
            [Line(ln.fixed * f, ln.per_token * f) for ln in self.layer_prefill],
            [d * f for d in self.layer_decode],
            self.embed * f,
            self.head * f,
            self.precision,
            self.threads,
            self.host,
            self.measured_at,
            factor,
            self.wire,
            self.num_layers,
        )

    # -- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostProfile:
        d = dict(d)
        d["layer_prefill"] = [Line(**ln) for ln in d["layer_prefill"]]
        d["wire"] = {c: [Line(**ln) for ln in ls] for c, ls in d.get("wire", {}).items()}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> CostProfile:
        return cls.from_dict(json.loads(s))
