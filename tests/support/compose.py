"""docker-compose.yml as data, and a check that a command line in it (or in a manifest) names one of
our programs and passes its flags."""

from __future__ import annotations

import yaml

from coinfer.settings_cli import settings_from_args
from device_agent.cli import build_parser as agent_parser
from device_agent.config import AgentSettings
from edge_server.cli import build_parser as edge_parser
from edge_server.config import EdgeSettings
from tests.support.paths import REPO

# console script -> (its argument parser, its settings class)
PARSERS = {"edge-server": (edge_parser, EdgeSettings), "device-agent": (agent_parser, AgentSettings)}


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def check_command(argv: list[str]) -> None:
    """The program exists (our console script or `python -m` of our module) and accepts the flags."""
    if argv[0] in PARSERS:
        make_parser, cls = PARSERS[argv[0]]
        parser = make_parser()
        settings_from_args(cls, parser.parse_args(argv[1:]), parser)
    elif argv[:2] == ["python", "-m"]:
        module = argv[2]
        mod = __import__(module, fromlist=["build_parser"])
        mod.build_parser().parse_args(argv[3:])
    else:
        raise AssertionError(f"unknown program in docker-compose.yml: {argv[0]}")
