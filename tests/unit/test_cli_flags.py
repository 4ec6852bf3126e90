"""The command lines people expect: boolean flags as `--name` / `--no-name` (and the `--name true|false`
that scripts and manifests pass), `--version` on every program, and `coinfer up` passing any setting
through to the edge and the agent. Ports checked before the model loads: tests/component/test_cli_ports.py."""

from __future__ import annotations

import pytest

from coinfer import __version__
from coinfer.settings_cli import settings_from_args
from coinfer.tools import launcher
from device_agent.cli import build_parser as agent_parser
from device_agent.config import AgentSettings
from edge_server.cli import build_parser as edge_parser
from edge_server.config import EdgeSettings


def agent(argv: list[str]) -> AgentSettings:
    p = agent_parser()
    return settings_from_args(AgentSettings, p.parse_args(argv), p)


def edge(argv: list[str]) -> EdgeSettings:
    p = edge_parser()
    return settings_from_args(EdgeSettings, p.parse_args(argv), p)


@pytest.mark.parametrize(
    ("argv", "compile_"),
    [
        (["--compile"], True),
        (["--no-compile"], False),
        (["--compile", "false"], False),
        (["--compile", "true"], True),
        (["--compile=false"], False),
        (["--compile", "--port", "9"], True),  # no value: the next flag is not taken for one
        ([], False),
    ],
)
def test_boolean_flags_take_both_forms(argv, compile_):
    assert agent(argv).runtime.compile is compile_


def test_the_true_false_form_of_scripts_and_manifests_still_parses():
    assert agent(["--prefix-reuse", "false"]).prefix.prefix_reuse is False
    e = edge(["--profile", "false", "--prefix-reuse", "false", "--ops-auth", "true"])
    assert (e.runtime.profile, e.kv.prefix_reuse, e.security.ops_auth) == (False, False, True)
    e = edge(["--no-profile", "--no-ops-auth"])
    assert (e.runtime.profile, e.security.ops_auth) == (False, False)


def test_a_flag_not_given_leaves_the_environment_and_a_given_one_beats_it(monkeypatch):
    monkeypatch.setenv("COINFER_COMPILE", "true")
    monkeypatch.setenv("COINFER_PREFIX_REUSE", "false")
    a = agent(["--port", "9"])
    assert (a.runtime.compile, a.prefix.prefix_reuse) == (True, False)
    a = agent(["--no-compile", "--prefix-reuse"])
    assert (a.runtime.compile, a.prefix.prefix_reuse) == (False, True)


@pytest.mark.parametrize("argv", [["--compile", "maybe"], ["--no-compile", "true"]])
def test_a_bad_boolean_exits_2_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as e:
        agent(argv)
    assert e.value.code == 2 and "--compile" in capsys.readouterr().err


def test_help_shows_both_forms(capsys):
    with pytest.raises(SystemExit):
        agent_parser().parse_args(["--help"])
    assert "--compile [true|false], --no-compile" in capsys.readouterr().out


@pytest.mark.parametrize(("prog", "parse"), [("device-agent", agent), ("edge-server", edge)])
def test_apps_print_their_version(prog, parse, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {__version__}"


def test_coinfer_prints_its_version(capsys):
    from coinfer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"coinfer {__version__}"


def _app_args(argv: list[str]) -> list[str]:
    """An app's flags from a launcher command line: what follows its program (a script or python -m)."""
    return argv[argv.index("--model-dir") :]


def test_coinfer_up_passes_settings_through_to_each_process(monkeypatch):
    from coinfer.cli import main

    seen: dict = {}
    monkeypatch.setattr(launcher, "up", lambda *a: seen.update(call=a) or 0)  # no process starts
    rc = main(
        [
            "up",
            "--split",
            "3",
            "--edge-arg=--max-sessions=4",
            "--edge-arg=--no-profile",
            "--agent-arg=--weights=int4",
            "--agent-arg=--compile --codec int8",
        ]
    )
    assert rc == 0
    model, port, grpc_port, ops_port, agent_args, edge_args = seen["call"]
    edge_argv = launcher.edge_argv(model, grpc_port, ops_port, edge_args)
    agent_argv = launcher.agent_argv(model, "127.0.0.1:50051", port, agent_args)
    assert edge_argv[-2:] == ["--max-sessions=4", "--no-profile"]
    assert agent_argv[-4:] == ["--weights=int4", "--compile", "--codec", "int8"]
    e, a = edge(_app_args(edge_argv)), agent(_app_args(agent_argv))
    assert (e.limits.max_sessions, e.runtime.profile, e.server.grpc_port) == (4, False, 50051)
    # a passed flag comes after coinfer up's own, so it wins (--codec int8 over up's --codec f16)
    assert (a.runtime.weights, a.runtime.compile, a.routing.codec, a.routing.split) == ("int4", True, "int8", "3")


def test_coinfer_up_without_pass_through_keeps_its_old_command_lines(monkeypatch):
    from coinfer.cli import main

    seen: dict = {}
    monkeypatch.setattr(launcher, "up", lambda *a: seen.update(call=a) or 0)
    assert main(["up"]) == 0
    assert seen["call"][4:] == (["--split", "auto", "--codec", "f16"], [])
