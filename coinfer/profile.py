"""Per-layer cost profiles: what each side's hardware takes per layer, measured at start-up.

A `CostProfile` covers the layers [start, stop) one side holds (device: [0, D), edge:
[m, N)) and gives, per layer, prefill seconds as a line in the token count (fitted over a
few prompt sizes) and decode seconds per token; plus the embedding and norm + lm_head.
The device also measures `wire`: the bytes a hidden-state frame takes after each layer for
each codec, so the partitioner prices the link with real frames, not a formula.

Profiles are measured once per (model fingerprint, host, precision, threads, torch) and
cached as JSON, because measuring costs a few seconds on a small CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from coinfer import codec as codecs
from coinfer.model.compiled import GroupedDecode
from coinfer.model.kv_cache import KVCache
from coinfer.model.llama import ModelSlice, causal_mask, decode_layers, rope_cos_sin

log = logging.getLogger("coinfer.profile")
PROFILE_VERSION = 2
PREFILL_SIZES = (16, 64, 128)  # tokens; a line through these prices any prompt length
DECODE_CONTEXT = 128  # decode steps are timed after a prefill of this many tokens
STEP_MESSAGE_OVERHEAD = 20  # protobuf + gRPC + HTTP/2 framing around a Step frame, bytes
DEFAULT_PROFILE_DIR = "~/.cache/coinfer/profiles"


@dataclass(frozen=True)
class Line:
    """seconds (or bytes) = fixed + per_token * tokens"""

    fixed: float
    per_token: float

    def __call__(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    @staticmethod
    def fit(xs: list[float], ys: list[float]) -> "Line":
        """Least squares; slope and intercept clamped at 0 (costs do not shrink with tokens)."""
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
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

    def slowed(self, factor: float) -> "CostProfile":
        """This profile on a device `factor` times slower (benchmark emulation)."""
        f = factor / self.slowdown
        return CostProfile(
            self.start, self.stop, [Line(l.fixed * f, l.per_token * f) for l in self.layer_prefill],
            [d * f for d in self.layer_decode], self.embed * f, self.head * f, self.precision, self.threads,
            self.host, self.measured_at, factor, self.wire, self.num_layers)

    # -- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostProfile":
        d = dict(d)
        d["layer_prefill"] = [Line(**l) for l in d["layer_prefill"]]
        d["wire"] = {c: [Line(**l) for l in ls] for c, ls in d.get("wire", {}).items()}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "CostProfile":
        return cls.from_dict(json.loads(s))


# -- measuring ------------------------------------------------------------------------------

def _timed_layers(model: ModelSlice, x: torch.Tensor, cache: KVCache,
                  on_block: Callable[[int, torch.Tensor], None] | None = None
                  ) -> tuple[torch.Tensor, list[float], float]:
    """The forward of ModelSlice, timing each block: (hidden out, seconds per block, embed seconds).
    `on_block(i, hidden)` sees each block's output, outside the timed region."""
    t0 = time.perf_counter()
    if model.embed_tokens is not None:
        x = model.embed_tokens(x)
    x = x.to(model.dtype)
    embed = time.perf_counter() - t0
    T, past = x.shape[1], cache.length
    cache.reserve(past + T)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(past, past + T), x.dtype)
    if T == 1 and on_block is None:  # a decode step: time the calls ModelSlice.forward makes
        x, times = _timed_decode(model, x, cos, sin, cache)
        cache.advance(T)
        return x, times, embed
    mask = causal_mask(past, T)
    times = []
    for i, block in enumerate(model.layers):
        t0 = time.perf_counter()
        x = block(x, cos, sin, cache, i, mask)
        times.append(time.perf_counter() - t0)
        if on_block is not None:
            on_block(i, x)
    cache.advance(T)
    return x, times, embed


def _timed_decode(model: ModelSlice, x, cos, sin, cache: KVCache) -> tuple[torch.Tensor, list[float]]:
    """One decode step through the slice's blocks, seconds per block. A compiled step runs several
    blocks per graph (coinfer.model.compiled): each of them is charged an equal share of its call."""
    layers, times = list(model.layers), []
    # uncompiled, ModelSlice.forward runs decode_layers over all blocks: timed here one block a call
    grouped = (layers and layers[0].compiled_decode) or GroupedDecode(decode_layers, 1)
    for i, j in grouped.spans(len(layers)):
        t0 = time.perf_counter()
        x = grouped.step(layers[i:j], x, cos, sin, cache.k[i:j], cache.v[i:j], cache.length)
        times += [(time.perf_counter() - t0) / (j - i)] * (j - i)
    return x, times


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def _inputs(model: ModelSlice, tokens: int, gen: torch.Generator) -> torch.Tensor:
    if model.embed_tokens is not None:
        return torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=gen)
    return torch.randn(1, tokens, model.cfg.hidden_size, generator=gen)


def measure(model: ModelSlice, repeats: int = 3, decode_steps: int = 8, wire_codecs: tuple[str, ...] = (),
            sizes: tuple[int, ...] = PREFILL_SIZES) -> CostProfile:
    """Time every layer of `model` on this machine. Call it on the compute thread."""
    gen = torch.Generator().manual_seed(0)
    n = model.num_layers
    samples: dict[int, list[list[float]]] = {T: [[] for _ in range(n)] for T in sizes}
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first round warms up and is discarded
            for T in sizes:
                x = _inputs(model, T, gen)
                cache = model.new_cache()
                cache.reserve(T + decode_steps + 1)
                _, times, _ = _timed_layers(model, x, cache)
                if r:
                    for i, t in enumerate(times):
                        samples[T][i].append(t)
        decode = [[] for _ in range(n)]
        heads, embed_steps = [], []
        cache = model.new_cache()
        _timed_layers(model, _inputs(model, DECODE_CONTEXT, gen), cache)
        for _ in range(decode_steps):
            h, times, embed = _timed_layers(model, _inputs(model, 1, gen), cache)
            embed_steps.append(embed)
            for i, t in enumerate(times):
                decode[i].append(t)
            if model.lm_head is not None:
                t0 = time.perf_counter()
                int(model.lm_head(model.norm(h[:, -1:]))[0, -1].argmax())
                heads.append(time.perf_counter() - t0)
        wire = _measure_wire(model, gen, wire_codecs) if wire_codecs and n else {}
    prefill = [Line.fit([float(T) for T in sizes for _ in samples[T][i]],
                        [t for T in sizes for t in samples[T][i]]) for i in range(n)]
    return CostProfile(
        start=model.start, stop=model.stop, layer_prefill=prefill, layer_decode=[_median(d) for d in decode],
        embed=_median(embed_steps) if model.embed_tokens is not None else 0.0,
        head=_median(heads) if heads else 0.0, precision=model.precision, threads=torch.get_num_threads(),
        host=socket.gethostname(), measured_at=time.time(), wire=wire, num_layers=model.cfg.num_layers)


def _measure_wire(model: ModelSlice, gen: torch.Generator, names: tuple[str, ...], tokens: int = 64) -> dict:
    """Frame bytes after each layer, for 1 token and for `tokens` tokens, per codec."""
    wire: dict[str, list[Line]] = {c: [] for c in names}

    def encode(i: int, x: torch.Tensor) -> None:
        h = x[0].float()
        for c in names:
            one, many = len(codecs.encode(h[-1:], c)), len(codecs.encode(h, c))
            per = (many - one) / (tokens - 1)
            wire[c].append(Line(one - per, per))

    _timed_layers(model, _inputs(model, tokens, gen), model.new_cache(), encode)
    return wire


# -- caching --------------------------------------------------------------------------------
def cache_key(fingerprint: str, model: ModelSlice, threads: int, wire_codecs: tuple[str, ...]) -> str:
    parts = [str(PROFILE_VERSION), fingerprint, socket.gethostname(), platform.machine(), torch.__version__,
             model.precision, str(model.start), str(model.stop), str(model.embed_tokens is not None),
             str(model.lm_head is not None), str(threads), ",".join(wire_codecs), f"compiled={model.compiled}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def load_or_measure(model: ModelSlice, fingerprint: str, cache_dir: str | Path | None,
                    wire_codecs: tuple[str, ...] = ()) -> CostProfile:
    """The cached profile for this model, host and settings, or a fresh measurement (then cached)."""
    key = cache_key(fingerprint, model, torch.get_num_threads(), wire_codecs)
    path = Path(cache_dir).expanduser() / f"{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return CostProfile.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as e:
            log.warning("ignoring unreadable profile cache %s (%s)", path, e)
    t0 = time.perf_counter()
    profile = measure(model, wire_codecs=wire_codecs)
    log.info("measured cost profile of layers [%d, %d) in %.1f s", model.start, model.stop, time.perf_counter() - t0)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(profile.to_json())
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot cache the profile in %s (%s)", path, e)
    return profile


# -- wire form (Describe) -------------------------------------------------------------------
def to_pb(p: CostProfile):
    from coinfer.v1 import edge_pb2 as pb

    return pb.CostProfile(
        start=p.start, stop=p.stop, layer_prefill_seconds=[pb.CostLine(fixed=l.fixed, per_token=l.per_token)
                                                           for l in p.layer_prefill],
        layer_decode_seconds=p.layer_decode, embed_seconds=p.embed, head_seconds=p.head, precision=p.precision,
        threads=p.threads, host=p.host, measured_at=p.measured_at)


def from_pb(m) -> CostProfile:
    """A profile from the wire; ValueError when it is inconsistent."""
    n = m.stop - m.start
    if n < 0 or len(m.layer_prefill_seconds) != n or len(m.layer_decode_seconds) != n:
        raise ValueError(f"cost profile for layers [{m.start}, {m.stop}) has {len(m.layer_prefill_seconds)} "
                         f"prefill and {len(m.layer_decode_seconds)} decode entries")
    return CostProfile(m.start, m.stop, [Line(l.fixed, l.per_token) for l in m.layer_prefill_seconds],
                       list(m.layer_decode_seconds), m.embed_seconds, m.head_seconds, m.precision, m.threads,
                       m.host, m.measured_at)
