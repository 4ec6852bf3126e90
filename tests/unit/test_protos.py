"""The committed gRPC code is what `make protos` generates from protos/ (no drift)."""

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO


def test_regenerating_the_protos_gives_no_diff(tmp_path: Path):
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iprotos",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        "protos/coinfer/v1/edge.proto",
    ]
    subprocess.run(cmd, cwd=REPO, check=True)
    for name in ("edge_pb2.py", "edge_pb2.pyi", "edge_pb2_grpc.py"):
        fresh, committed = tmp_path / "coinfer/v1" / name, REPO / "coinfer/v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{committed} is stale: run `make protos`"


def test_makefile_protos_target_uses_the_same_command():
    makefile = (REPO / "Makefile").read_text()
    assert (
        "grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/coinfer/v1/edge.proto"
        in makefile
    )
