"""One thread per process runs all PyTorch compute (model loading, forwards, sampling, frame encoding).

Why: libgomp keeps one OpenMP thread team per calling thread. Once two threads of a process
have run parallel regions, there are more OpenMP threads than cores on a small CPU, libgomp
stops spin-waiting, and every parallel region pays a futex wake-up: decode falls to about the
speed of one thread (`python benchmarks/compute_thread.py` measures it; benchmarks/README.md).
Servers hand work to this thread from their gRPC / HTTP handler threads and wait for it;
it also serializes forwards, which on a CPU only fight over the same cores anyway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-compute")
_ident = _executor.submit(threading.get_ident).result()


def on_compute_thread() -> bool:
    return threading.get_ident() == _ident


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on the compute thread (directly if already there); exceptions propagate."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


def run_timed(fn: Callable[..., T], *args, **kwargs) -> tuple[T, float, float]:
    """(result, seconds queued behind other work, seconds running)."""
    submitted = time.perf_counter()
    started = []

    def job():
        started.append(time.perf_counter())
        return fn(*args, **kwargs)

    result = run(job)
    end = time.perf_counter()
    return result, started[0] - submitted, end - started[0]


def set_num_threads(n: int) -> None:
    """torch.set_num_threads where it counts: OpenMP's thread count is per calling thread."""
    import torch

    run(torch.set_num_threads, n)
