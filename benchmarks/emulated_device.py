"""BENCHMARKS ONLY: the device agent on an emulated slower device. The head sleeps (f - 1) x each
forward's time and its cost profile says f x as slow, so the planner prices cuts for that device.

Everything else is the real agent: the same settings, flags and app (device_agent.cli). The knob
lives here, not among the agent's settings, so no deployment can turn it on.

    python -m benchmarks.emulated_device --slowdown 4 <device-agent flags>
    python benchmarks/emulated_device.py --slowdown 4 <device-agent flags>
"""

from __future__ import annotations

import argparse
import sys

from coinfer.settings_cli import parse_app_args
from device_agent.cli import build_app, build_parser, load_head, run
from device_agent.config import AgentSettings


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)  # --help: the agent's flags
    own.add_argument("--slowdown", type=float, default=1.0, help="emulate a device this many times slower (>= 1)")
    a, rest = own.parse_known_args(argv)
    parser = build_parser()
    parser.epilog = "--slowdown F (this wrapper's own): emulate a device F >= 1 times slower."
    if a.slowdown < 1.0:
        parser.error(f"--slowdown must be at least 1, got {a.slowdown:g}")
    settings = parse_app_args(parser, AgentSettings, rest)
    return run(settings, lambda s: build_app(s, load_head(s.runtime, a.slowdown)))


if __name__ == "__main__":
    sys.exit(main())
