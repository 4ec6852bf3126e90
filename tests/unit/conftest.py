"""Unit tests are pure: a unit test (its setup, body and teardown, module fixtures included) that
connects or binds a socket, opens a gRPC channel or server, starts a thread or calls torch.compile
fails, with the reason. Such a test belongs in tests/component (see tests/README.md).

The guard raises where the test does it (so nothing is left half started) and, in case the code
under test swallows that error, fails the phase afterwards as well. It covers the fixtures a phase
builds, the tiny models of tests/conftest.py included. Two libraries' own worker threads are
switched off inside the guard rather than refused: tqdm's monitor (progress bars while a model is
written or fingerprinted) and transformers' parallel weight loading (HF_DEACTIVATE_ASYNC_LOAD=1,
which loads the same tensors one after another). coinfer.compute's one compute thread starts when
that module is first imported: it is imported here, before any guard, so a unit test that happens
to be the first to import it (run alone) is not taken for one that starts threads.
"""

from __future__ import annotations

import socket
import threading
import traceback

import grpc
import grpc.aio
import pytest
import torch
import tqdm

import coinfer.compute  # noqa: F401 - starts the library's compute thread outside the guard (see above)

# (owner, attribute, what the test did)
FORBIDDEN = [
    (socket.socket, "connect", "connected a socket"),
    (socket.socket, "connect_ex", "connected a socket"),
    (socket.socket, "bind", "bound a socket"),
    (grpc, "insecure_channel", "opened a gRPC channel"),
    (grpc, "secure_channel", "opened a gRPC channel"),
    (grpc, "server", "started a gRPC server"),
    (grpc.aio, "insecure_channel", "opened a gRPC channel"),
    (grpc.aio, "secure_channel", "opened a gRPC channel"),
    (grpc.aio, "server", "started a gRPC server"),
    (threading.Thread, "start", "started a thread"),
    (torch, "compile", "called torch.compile"),
]


class ImpureUnitTest(Exception):
    pass


def _refuse(what: str, seen: list[tuple[str, str]]):
    def refused(*args, **kwargs):
        stack = traceback.extract_stack()[:-1]  # where it was called from, innermost last
        seen.append((what, "".join(traceback.format_list(stack[-6:]))))
        raise ImpureUnitTest(f"a unit test {what}: it belongs in tests/component (tests/README.md)")

    return refused


def _guarded(item: pytest.Item):
    """One phase of a unit test with the forbidden calls replaced; it fails if it tried one."""
    seen: list[tuple[str, str]] = []
    patch = pytest.MonkeyPatch()
    for owner, name, what in FORBIDDEN:
        patch.setattr(owner, name, _refuse(what, seen))
    # threads that are the libraries' own, not the test's: tqdm's monitor, transformers' parallel loading
    patch.setattr(tqdm.tqdm, "monitor_interval", 0)
    patch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    try:
        return (yield)
    finally:
        patch.undo()
        if seen:  # also when the code under test swallowed the error, or failed in another way because of it
            what, where = seen[0]
            pytest.fail(
                f"{item.nodeid} {what}: move it to tests/component (tests/README.md). Called from:\n{where}",
                pytrace=False,
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded(item))
