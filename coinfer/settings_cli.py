"""Command-line flags generated from grouped settings (coinfer.settings_groups), so each app's
`--help` lists every setting under its group with its unit, default and `COINFER_` variable, and
flags override env. `coinfer plan` generates its planner flags from the same groups.

A boolean setting is a `BoolFlag`: `--name` / `--no-name` as people expect of a command line, and
`--name true|false` as the scripts, manifests and compose files of this repository pass it."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from typing import TypeVar

from pydantic import TypeAdapter, ValidationError

from coinfer import __version__
from coinfer.settings_groups import GroupedSettings, SettingsGroup

S = TypeVar("S", bound=GroupedSettings)
G = TypeVar("G", bound=SettingsGroup)
_BOOL = TypeAdapter(bool)


class BoolFlag(argparse.BooleanOptionalAction):
    """`--name` (true), `--no-name` (false), or `--name VALUE` with VALUE any boolean the environment
    variable takes (true/false, 1/0, yes/no, on/off). The optional value keeps every existing
    `--name true|false` command line valid; a flag not given stays None, so the environment holds."""

    def __init__(self, option_strings, dest, default=None, required=False, help=None) -> None:
        super().__init__(option_strings, dest, default=default, required=required, help=help)
        self.nargs, self.metavar = "?", "true|false"

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        negated = bool(option_string and option_string.startswith("--no-"))
        if negated and values is not None:
            raise argparse.ArgumentError(self, f"{option_string} takes no value")
        try:
            value = True if values is None else _BOOL.validate_python(values)
        except ValidationError:
            raise argparse.ArgumentError(self, f"expected true or false, got {values!r}") from None
        setattr(namespace, self.dest, not value if negated else value)


class HelpFormatter(argparse.HelpFormatter):
    """Shows a BoolFlag as `--name [true|false], --no-name` rather than a value after each form."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            return f"{action.option_strings[0]} [{action.metavar}], {', '.join(action.option_strings[1:])}"
        return super()._format_action_invocation(action)


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: `<prog> <coinfer version>`, exit 0 (what a bug report or a deploy check asks first)."""
    parser.add_argument("--version", action="version", version=f"{parser.prog} {__version__}")


def app_parser(prog: str, description: str, cls: type[GroupedSettings]) -> argparse.ArgumentParser:
    """An app's parser: one flag per setting, plus --log-level."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description + " Every flag can also be set as a "
        f"{cls.model_config.get('env_prefix', '')} environment variable.",
        formatter_class=HelpFormatter,
    )
    add_settings_flags(p, cls)
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    add_version(p)
    return p


def parse_app_args(parser: argparse.ArgumentParser, cls: type[S], argv: list[str] | None) -> S:
    """Parse argv, build the settings (exit 2 on a bad value), set up logging."""
    args = parser.parse_args(argv)
    settings = settings_from_args(cls, args, parser)
    setup_logging(args.log_level)
    return settings


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[GroupedSettings]) -> None:
    """A flag per setting of every group, each group a section of `--help`."""
    for group in cls.groups().values():
        add_group_flags(parser, group, env_prefix=str(cls.model_config.get("env_prefix", "")))


def add_group_flags(
    parser: argparse.ArgumentParser, group: type[SettingsGroup], env_prefix: str | None
) -> argparse._ArgumentGroup:
    """`--field-name` per field of one group, in a `--help` section of its own (returned); env_prefix
    None: a tool that reads no environment (its help then names none)."""
    section = parser.add_argument_group(group.title(), group.purpose())
    for name, field in group.model_fields.items():
        env = "" if env_prefix is None else f"env {(env_prefix + name).upper()}, "
        flag, text = f"--{name.replace('_', '-')}", f"{field.description} [{env}default {field.default!r}]"
        if field.annotation is bool:
            section.add_argument(flag, dest=name, action=BoolFlag, default=None, help=text)
            continue
        kind = int if field.annotation is int else float if field.annotation is float else str
        section.add_argument(flag, dest=name, type=kind, default=None, metavar=name.upper(), help=text)
    return section


def given_flags(names: Iterable[str], args: argparse.Namespace) -> dict[str, object]:
    """The flags among `names` that were given on the command line."""
    wanted = set(names)
    return {k: v for k, v in vars(args).items() if k in wanted and v is not None}


def settings_from_args(cls: type[S], args: argparse.Namespace, parser: argparse.ArgumentParser) -> S:
    """Env + defaults, overridden by the flags that were given; invalid values -> parser.error (exit 2)."""
    try:
        return cls(**given_flags(cls.flat_fields(), args))
    except ValidationError as e:
        parser.error(validation_message(e))


def group_from_args(group: type[G], args: argparse.Namespace) -> G:
    """One group from its flags and its defaults (no environment). Raises ValidationError."""
    return group(**given_flags(group.model_fields, args))


def validation_message(e: ValidationError) -> str:
    """One line per error, each named by the setting (its flat name: the flag's and the variable's)."""
    return "; ".join(f"{'.'.join(map(str, err['loc'][-1:]))}: {err['msg']}" for err in e.errors())


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
