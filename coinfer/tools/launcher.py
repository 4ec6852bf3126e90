"""Start the edge server and the device agent as child processes, wait until both are ready,
stop them cleanly. Used by `coinfer up` (`make run`), the integration tests and the benchmarks.

Each app prints one machine-readable line when it listens: `READY key=value ...`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path


class LaunchError(RuntimeError):
    pass


class Proc:
    """A child process whose output is kept (last lines) and optionally echoed with a prefix."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, echo: bool = False) -> None:
        self.name, self.argv = name, argv
        self.lines: deque[str] = deque(maxlen=400)
        self.ready: dict[str, str] = {}
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._echo = echo
        threading.Thread(target=self._pump, name=f"{name}-output", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None  # started with stdout=PIPE
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("READY "):
                self.ready = dict(kv.split("=", 1) for kv in line.split()[1:])
                self._ready.set()
            if self._echo:
                print(f"[{self.name}] {line}", flush=True)

    def wait_ready(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else f"not ready in {timeout:.0f} s"
                )
                raise LaunchError(f"{self.name} {why}:\n" + "\n".join(list(self.lines)[-30:]))
        return self.ready

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after timeout; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-m", {"edge-server": "edge_server.cli", "device-agent": "device_agent.cli"}[name]]
    )


def _start(name: str, argv: list[str], env: dict | None, echo: bool, timeout: float) -> Proc:
    p = Proc(name, argv, env, echo)
    try:
        p.wait_ready(timeout)
    except LaunchError:
        p.kill()
        raise
    return p


def edge_argv(model_dir: str | Path, grpc_port: int = 0, ops_port: int = 0, args: Sequence[str] = ()) -> list[str]:
    """The edge's command line: its model, ports on 127.0.0.1, then `args` (later flags win, so `args`
    may override any of these)."""
    return _bin("edge-server") + [
        "--model-dir",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--ops-port",
        str(ops_port),
        *args,
    ]


def start_edge(
    model_dir: str | Path,
    grpc_port: int = 0,
    ops_port: int = 0,
    args: Sequence[str] = (),
    env: dict | None = None,
    echo: bool = False,
    timeout: float = 120.0,
) -> Proc:
    return _start("edge", edge_argv(model_dir, grpc_port, ops_port, args), env, echo, timeout)


def agent_argv(
    model_dir: str | Path, edge: str, port: int = 0, args: Sequence[str] = (), program: Sequence[str] = ()
) -> list[str]:
    """The agent's command line: its model, edge and port on 127.0.0.1, then `args` (later flags win).
    program: the command that runs the agent, when not `device-agent` itself (a benchmark's emulated
    device); it must take the agent's flags."""
    return [
        *(program or _bin("device-agent")),
        "--model-dir",
        str(model_dir),
        "--edge",
        edge,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]


def start_agent(
    model_dir: str | Path,
    edge: str,
    port: int = 0,
    args: Sequence[str] = (),
    env: dict | None = None,
    echo: bool = False,
    timeout: float = 120.0,
    program: Sequence[str] = (),
) -> Proc:
    return _start("device", agent_argv(model_dir, edge, port, args, program), env, echo, timeout)


def examples(base_url: str, model: str) -> str:
    return f"""
coinfer is up: device agent {base_url}  (edge gRPC behind it)

  curl {base_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{
    "model": "{model}",
    "messages": [{{"role": "user", "content": "What is the capital of France?"}}],
    "max_tokens": 64, "temperature": 0
  }}'

  python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base_url}/v1", api_key="unused")
stream = client.chat.completions.create(
    model="{model}", stream=True, max_tokens=64,
    messages=[{{"role": "user", "content": "Write a haiku about the edge."}}])
for chunk in stream:
    print((chunk.choices[0].delta.content or "") if chunk.choices else "", end="", flush=True)
print()
PY

Ctrl-C stops both.
"""


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def up(
    model_dir: str | Path,
    port: int = 8000,
    grpc_port: int = 50051,
    ops_port: int = 8081,
    agent_args: Sequence[str] = (),
    edge_args: Sequence[str] = (),
) -> int:
    """`make run`: both apps in the foreground until Ctrl-C (or SIGTERM)."""
    # explicit for SIGINT too: a shell that starts us in the background leaves it ignored
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    procs: list[Proc] = []
    try:
        print(f"starting edge server (gRPC 127.0.0.1:{grpc_port}, ops http://127.0.0.1:{ops_port}) ...", flush=True)
        procs.append(start_edge(model_dir, grpc_port, ops_port, edge_args, echo=True))
        print(f"starting device agent (http://127.0.0.1:{port}) ...", flush=True)
        procs.append(start_agent(model_dir, procs[0].ready["grpc"], port, agent_args, echo=True))
        print(examples(procs[1].ready["http"], Path(model_dir).resolve().name), flush=True)
        while all(p.proc.poll() is None for p in procs):
            time.sleep(0.5)
        print("a server exited; stopping the other", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except LaunchError as e:
        print(f"coinfer up: {e}", file=sys.stderr)
        return 1
    finally:
        # a second Ctrl-C must not abandon a child half-stopped; stop() escalates to SIGKILL itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in reversed(procs):
            p.stop()
        print("stopped", flush=True)
