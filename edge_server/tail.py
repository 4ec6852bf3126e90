"""TailRunner: the edge's part of the model, layers [k, N) + norm + lm_head, and its sessions' inputs.

The edge loads layers [min_split, N) once; a session at split k runs a parameter-sharing
view of [k, N). At k = 0 the view includes the embedding and the edge runs the whole model.
The runner validates and decodes what devices send into model inputs; the scheduler
(edge_server/scheduler.py) runs them, batched, on the process's one compute thread.
At start-up the runner measures (or reads from its cache) the per-layer cost profile it
serves in Describe, and it tracks its recent queue wait as the load the device plans with.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coinfer import codec, compute, profile
from coinfer.model import ModelConfig, load_slice
from coinfer.model.kv_cache import KVCache
from coinfer.model.llama import ModelSlice
from coinfer.model.sampling import Sampler, SamplingParams
from coinfer.model.weights import read_fingerprint
from coinfer.prefix import PrefixChain
from edge_server.errors import BadInput


@dataclass
class Timings:
    queue: float = 0.0  # waiting for the model lock, s
    compute: float = 0.0  # forward + sampling, s
    decode: float = 0.0  # tensor frame decoding, s

    def add(self, other: Timings) -> None:
        self.queue += other.queue
        self.compute += other.compute
        self.decode += other.decode


@dataclass
class TailSession:
    """One session's state on the edge: its slice view, KV cache, sampler, prefix chain and counters."""

    split: int
    codec: str
    model: ModelSlice
    cache: KVCache
    sampler: Sampler
    session_id: str = ""
    owner: str = ""  # the client identity that opened it (edge_server/security.py)
    max_new: int = 1
    prompt_tokens: int = 0  # positions the prompt fills (cached prefix included)
    cached_tokens: int = 0  # of which reused from a kept cache
    generated: int = 0
    total: Timings = field(default_factory=Timings)
    chain: PrefixChain | None = None  # names the positions of the cache, for keeping it afterwards
    chain_blocks: list[bytes] = field(default_factory=list)  # names of the claimed prefix's blocks
    opened_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0  # work items queued or running: not evictable
    evicted: str = ""  # why the cache was evicted ("" = not evicted)
    decoding: bool = False
    stop: Callable[[], None] | None = None  # ends its stream's handling: a resume of the same session came
    resume_token: bytes = b""  # the session's capability: a resume must present it
    start_state: bytes | None = None  # prefix chain state at cached_tokens when known (split 0 verifies names)

    @property
    def position(self) -> int:
        return self.cache.length

    def expected_remaining(self) -> float:
        """Seconds this session will probably still run, from its pace so far."""
        if not self.generated:
            return 1.0
        pace = (time.monotonic() - self.opened_at) / self.generated
        return max(0, self.max_new - self.generated) * pace


class LoadTracker:
    """Recent load of the compute thread: mean queue wait per work item and busy share over `window` s.

    The device's planner adds the queue wait to every edge work item it would send here.
    """

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self._items: deque[tuple[float, float, float]] = deque()  # (end time, queue s, compute s)
        self._lock = threading.Lock()

    def record(self, queue: float, compute_s: float, now: float | None = None) -> None:
        with self._lock:
            self._items.append((time.monotonic() if now is None else now, queue, compute_s))

    def snapshot(self, now: float | None = None) -> tuple[float, float]:
        """(mean queue seconds, busy fraction) over the window; (0, 0) when idle."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._items and self._items[0][0] < now - self.window:
                self._items.popleft()
            if not self._items:
                return 0.0, 0.0
            queue = sum(q for _, q, _ in self._items) / len(self._items)
            return queue, min(1.0, sum(c for _, _, c in self._items) / self.window)


class TailRunner:
    def __init__(
        self,
        model_dir: str | Path,
        min_split: int = 0,
        max_frame_bytes: int = 64 << 20,
        weights: str = "fp32",
        profile_dir: str | None = profile.DEFAULT_PROFILE_DIR,
        measure_profile: bool = True,
        kv_chunk: int = 64,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.cfg = ModelConfig.from_dir(model_dir)
        if not 0 <= min_split <= self.cfg.num_layers:
            raise ValueError(f"min_split must be in 0..{self.cfg.num_layers}, got {min_split}")
        self.fingerprint = read_fingerprint(model_dir)
        self.min_split = min_split
        self.max_frame_bytes = max_frame_bytes
        self.kv_chunk = kv_chunk  # positions a session's cache grows by
        self.model = compute.run(
            load_slice, model_dir, min_split, self.cfg.num_layers, embed=min_split == 0, head=True, precision=weights
        )
        self.load = LoadTracker()
        self.profile = (
            compute.run(profile.load_or_measure, self.model, self.fingerprint, profile_dir) if measure_profile else None
        )

    def new_session(
        self, split: int, codec_name: str, sampling: SamplingParams, session_id: str = "", max_new: int = 1
    ) -> TailSession:
        """Caller has validated split and codec. The cache allocates nothing until the store reserves it."""
        view = self.model.narrow(split, self.cfg.num_layers)
        return TailSession(
            split,
            codec_name,
            view,
            view.new_cache(chunk=self.kv_chunk),
            Sampler(sampling),
            session_id=session_id,
            max_new=max_new,
        )

    def prefill_input(self, s: TailSession, frame: bytes | None, token_ids: list[int], t: Timings) -> torch.Tensor:
        """The prompt (after any cached prefix) as model input: ids [1, T] or hidden [1, T, d].

        Raises codec.CodecError, BadInput.
        """
        if s.split == 0:
            if not token_ids:
                raise BadInput("prefill at split 0 needs token_ids")
            if max(token_ids) >= self.cfg.vocab_size:
                raise BadInput(f"token id {max(token_ids)} is outside the vocabulary (size {self.cfg.vocab_size})")
            x = torch.tensor([token_ids])
        else:
            x = self._decode(frame, t)
        if x.shape[1] == 0:
            raise BadInput("prefill is empty")
        return x

    def step_input(self, s: TailSession, frame: bytes | None, token_id: int) -> tuple[torch.Tensor, Timings]:
        """One decode step's input: the hidden state [1, d] (k > 0) or the id [1] (k = 0) of the last token."""
        t = Timings()
        x = torch.tensor([token_id]) if s.split == 0 else self._decode(frame, t)[0]
        if x.shape[0] != 1:
            raise BadInput(f"a step carries exactly 1 token, got {x.shape[0]}")
        return x, t

    def _decode(self, frame: bytes | None, t: Timings) -> torch.Tensor:
        if not frame:
            raise BadInput("a hidden-state frame is required at split > 0")
        t0 = time.perf_counter()
        hidden = codec.decode(frame, hidden_size=self.cfg.hidden_size, max_decoded_bytes=self.max_frame_bytes)
        t.decode = time.perf_counter() - t0
        if hidden.dim() != 2:
            raise codec.CodecError(f"expected hidden states [T, d], got shape {tuple(hidden.shape)}")
        return hidden[None]  # [1, T, d]
