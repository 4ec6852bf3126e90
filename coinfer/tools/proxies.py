"""Run the committed nginx / HAProxy configs (deploy/) on loopback in front of local edge replicas.

The config files are the deployable ones (compose host names edge-N:50051, ops port 8081); this
renders them with the replicas' loopback ports so that the scale-out tests and benchmark exercise
exactly what users deploy. Needs a source checkout (deploy/ is not part of the wheel).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"  # the checkout's deploy/ (this file: coinfer/tools/)


class ProxyMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_nginx(replicas: list[tuple[str, str]], port: int, workdir: Path) -> str:
    """replicas: (grpc address, ops address) per edge."""
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    lines = [f"        server {grpc} max_fails=1 fail_timeout=10s;" for grpc, _ in replicas]
    text = re.sub(r"(?m)^\s*server edge-\d+:50051[^\n]*\n", "", text)
    text = text.replace("        keepalive 64;", "\n".join(lines) + "\n        keepalive 64;")
    text = text.replace("listen 50051 http2;", f"listen 127.0.0.1:{port} http2;")
    return text.replace("/tmp/coinfer-nginx", str(workdir / "nginx"))


def render_haproxy(replicas: list[tuple[str, str]], port: int, workdir: Path) -> str:
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    lines = [f"    server edge-{i + 1} {grpc} port {ops.rsplit(':', 1)[1]}" for i, (grpc, ops) in enumerate(replicas)]
    text = re.sub(r"(?m)^\s*server edge-\d+ edge-\d+:50051[^\n]*\n", "", text)
    text = text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    return text.replace("bind *:50051 proto h2", f"bind 127.0.0.1:{port} proto h2")


class Proxy:
    """nginx or haproxy as a child process on a free loopback port."""

    def __init__(self, kind: str, replicas: list[tuple[str, str]], port: int = 0) -> None:
        if not DEPLOY.is_dir():
            raise ProxyMissing(f"no {DEPLOY}: run from a source checkout of coinfer")
        exe = shutil.which(kind) or (f"/usr/sbin/{kind}" if Path(f"/usr/sbin/{kind}").exists() else None)
        if exe is None:
            raise ProxyMissing(
                f"{kind} is not installed (apt-get install {'nginx-light' if kind == 'nginx' else kind})"
            )
        self.kind, self.port = kind, port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"coinfer-{kind}-"))
        conf = self.workdir / f"{kind}.conf"
        if kind == "nginx":
            conf.write_text(render_nginx(replicas, self.port, self.workdir))
            argv = [exe, "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
        else:
            conf.write_text(render_haproxy(replicas, self.port, self.workdir))
            argv = [exe, "-db", "-f", str(conf)]
        self.conf = conf
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self._wait_listening()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read() if self.proc.stdout is not None else ""
                raise RuntimeError(f"{self.kind} exited: {output}\nconfig:\n{self.conf.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind} not listening on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
