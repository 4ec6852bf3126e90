"""Command-line flags generated from a pydantic-settings class, so each app's `--help`
lists every setting with its unit, default and `COINFER_` variable, and flags override env."""

from __future__ import annotations

import argparse
import logging
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def app_parser(prog: str, description: str, cls: type[BaseSettings]) -> argparse.ArgumentParser:
    """An app's parser: one flag per setting, plus --log-level."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description + " Every flag can also be set as a "
        f"{cls.model_config.get('env_prefix', '')} environment variable.",
    )
    add_settings_flags(p, cls)
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def parse_app_args(parser: argparse.ArgumentParser, cls: type[S], argv: list[str] | None) -> S:
    """Parse argv, build the settings (exit 2 on a bad value), set up logging."""
    args = parser.parse_args(argv)
    settings = settings_from_args(cls, args, parser)
    setup_logging(args.log_level)
    return settings


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    prefix = cls.model_config.get("env_prefix", "")
    for name, field in cls.model_fields.items():
        env = f"{prefix}{name}".upper()
        kind = int if field.annotation is int else float if field.annotation is float else str
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,
            metavar=name.upper(),
            help=f"{field.description} [env {env}, default {field.default!r}]",
        )


def settings_from_args(cls: type[S], args: argparse.Namespace, parser: argparse.ArgumentParser) -> S:
    """Env + defaults, overridden by the flags that were given; invalid values -> parser.error (exit 2)."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    try:
        return cls(**given)
    except ValidationError as e:
        parser.error("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
