"""Measuring cost profiles: what each side's hardware takes per layer, timed at start-up.

The profile itself (coinfer/planning/cost_profile.py) is plain numbers: per layer, prefill
seconds as a line in the token count (fitted here over a few prompt sizes) and decode seconds
per token, the embedding and the head; on the device also the bytes of a hidden-state frame
after each layer for each codec (measured here by encoding real hidden states).

Profiles are measured once per (model fingerprint, host, precision, threads, torch) and
cached as JSON, because measuring costs a few seconds on a small CPU.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from coinfer import codec as codecs
from coinfer.model.compiled import GroupedDecode
from coinfer.model.kv_cache import KVCache
from coinfer.model.llama import ModelSlice, causal_mask, decode_layers, rope_cos_sin
from coinfer.model.weights import load_head, read_fingerprint
from coinfer.planning.cost_profile import CostProfile, Line

log = logging.getLogger("coinfer.profile")
PROFILE_VERSION = 2
PREFILL_SIZES = (16, 64, 128)  # tokens; a line through these prices any prompt length
DECODE_CONTEXT = 128  # decode steps are timed after a prefill of this many tokens
DEFAULT_PROFILE_DIR = "~/.cache/coinfer/profiles"


# -- measuring ------------------------------------------------------------------------------


def _timed_layers(
    model: ModelSlice, x: torch.Tensor, cache: KVCache, on_block: Callable[[int, torch.Tensor], None] | None = None
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
    grouped = (layers[0].compiled_decode if layers else None) or GroupedDecode(decode_layers, 1)
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


def measure(
    model: ModelSlice,
    repeats: int = 3,
    decode_steps: int = 8,
    wire_codecs: tuple[str, ...] = (),
    sizes: tuple[int, ...] = PREFILL_SIZES,
) -> CostProfile:
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
        decode: list[list[float]] = [[] for _ in range(n)]
        heads, embed_steps = [], []
        cache = model.new_cache()
        _timed_layers(model, _inputs(model, DECODE_CONTEXT, gen), cache)
        for _ in range(decode_steps):
            h, times, embed = _timed_layers(model, _inputs(model, 1, gen), cache)
            embed_steps.append(embed)
            for i, t in enumerate(times):
                decode[i].append(t)
            if model.lm_head is not None and model.norm is not None:  # both or neither
                t0 = time.perf_counter()
                int(model.lm_head(model.norm(h[:, -1:]))[0, -1].argmax())
                heads.append(time.perf_counter() - t0)
        wire = _measure_wire(model, gen, wire_codecs) if wire_codecs and n else {}
    prefill = [
        Line.fit([float(T) for T in sizes for _ in samples[T][i]], [t for T in sizes for t in samples[T][i]])
        for i in range(n)
    ]
    return CostProfile(
        start=model.start,
        stop=model.stop,
        layer_prefill=prefill,
        layer_decode=[_median(d) for d in decode],
        embed=_median(embed_steps) if model.embed_tokens is not None else 0.0,
        head=_median(heads) if heads else 0.0,
        precision=model.precision,
        threads=torch.get_num_threads(),
        host=socket.gethostname(),
        measured_at=time.time(),
        wire=wire,
        num_layers=model.cfg.num_layers,
    )


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
    parts = [
        str(PROFILE_VERSION),
        fingerprint,
        socket.gethostname(),
        platform.machine(),
        torch.__version__,
        model.precision,
        str(model.start),
        str(model.stop),
        str(model.embed_tokens is not None),
        str(model.lm_head is not None),
        str(threads),
        ",".join(wire_codecs),
        f"compiled={model.compiled}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def load_or_measure(
    model: ModelSlice, fingerprint: str, cache_dir: str | Path | None, wire_codecs: tuple[str, ...] = ()
) -> CostProfile:
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


def device_profile(
    model: ModelSlice, fingerprint: str, cache_dir: str | Path | None, slowdown: float = 1.0
) -> CostProfile:
    """A device's profile: per-layer costs (cached per host) and the frame bytes of every codec, scaled
    by the benchmark slowdown. Measured on the compute thread (coinfer.compute says why; imported here,
    not above, because importing it starts that thread and the edge's settings import this module)."""
    from coinfer import compute

    return compute.run(load_or_measure, model, fingerprint, cache_dir, tuple(codecs.CODECS)).slowed(slowdown)


def head_profile(
    model_dir: str | Path,
    max_layers: int = -1,
    precision: str = "fp32",
    slowdown: float = 1.0,
    cache_dir: str | Path | None = None,
) -> CostProfile:
    """The profile a device agent with these settings measures, without starting one (`coinfer plan`):
    the same slice (coinfer.model.load_head), hence the same cache entry."""
    from coinfer import compute

    model = compute.run(load_head, model_dir, max_layers, precision)
    return device_profile(model, read_fingerprint(model_dir), cache_dir, slowdown)


# -- wire form (Describe) -------------------------------------------------------------------
def to_pb(p: CostProfile):
    from coinfer.v1 import edge_pb2 as pb

    return pb.CostProfile(
        start=p.start,
        stop=p.stop,
        layer_prefill_seconds=[pb.CostLine(fixed=ln.fixed, per_token=ln.per_token) for ln in p.layer_prefill],
        layer_decode_seconds=p.layer_decode,
        embed_seconds=p.embed,
        head_seconds=p.head,
        precision=p.precision,
        threads=p.threads,
        host=p.host,
        measured_at=p.measured_at,
    )


def from_pb(m) -> CostProfile:
    """A profile from the wire; ValueError when it is inconsistent."""
    n = m.stop - m.start
    if n < 0 or len(m.layer_prefill_seconds) != n or len(m.layer_decode_seconds) != n:
        raise ValueError(
            f"cost profile for layers [{m.start}, {m.stop}) has {len(m.layer_prefill_seconds)} "
            f"prefill and {len(m.layer_decode_seconds)} decode entries"
        )
    return CostProfile(
        m.start,
        m.stop,
        [Line(ln.fixed, ln.per_token) for ln in m.layer_prefill_seconds],
        list(m.layer_decode_seconds),
        m.embed_seconds,
        m.head_seconds,
        m.precision,
        m.threads,
        m.host,
        m.measured_at,
    )
