"""Settings held in groups, named flat: each component is handed its group (the planner its planner
and energy settings, the edge pool its connection), while every environment variable stays
`COINFER_<FIELD>` and every flag `--field-name`, after the field's name inside its group.

Why flat outside: the names are the deployment interface (manifests, compose files, scripts, the
Ray Serve config); the groups are how the code hands settings around. So a field name is unique
across a class's groups, and no field is named like a group (checked when the class is defined).

Precedence, defaults < environment < keyword arguments (the apps pass the flags that were given as
keyword arguments): `FlatEnvSource` reads the variables into their groups, pydantic-settings merges
the keyword arguments over them, and `GroupedSettings._regroup` moves flat keyword arguments into
their groups, over what the group already holds. `AgentSettings(split="15")` and a grouped
`model_dump()` are therefore both valid input.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class SettingsGroup(BaseModel):
    """One group of settings. Its docstring is the group's purpose and `model_config["title"]` its
    heading, in `--help` and in docs/configuration.md."""

    # defaults are validated as a BaseSettings validates them
    model_config = ConfigDict(validate_default=True, extra="ignore")

    @classmethod
    def title(cls) -> str:
        return str(cls.model_config.get("title") or cls.__name__)

    @classmethod
    def purpose(cls) -> str:
        return " ".join((cls.__doc__ or "").split())


class FlatEnvSource(PydanticBaseSettingsSource):
    """`<env_prefix><FIELD>` variables (any case, as pydantic-settings matches them), each placed in
    its group. A variable named after a group is not read: pydantic-settings' own environment source
    would take it as JSON of the whole group, a second name for settings that each have one."""

    settings_cls: type[GroupedSettings]

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # abstract in the base class; __call__ reads everything at once

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.config.get("env_prefix") or "")
        environ = {k.lower(): v for k, v in os.environ.items()}
        out: dict[str, dict[str, str]] = {}
        for name, group in self.settings_cls.group_of().items():
            value = environ.get(f"{prefix}{name}".lower())
            if value is not None:
                out.setdefault(group, {})[name] = value
        return out


class GroupedSettings(BaseSettings):
    """A settings class whose fields are all SettingsGroup models, read from flat names."""

    model_config = SettingsConfigDict(env_prefix="COINFER_", extra="ignore")
    _group_of: ClassVar[dict[str, str]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._group_of = _group_map(cls)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, FlatEnvSource(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _regroup(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        owner = cls.group_of()
        out = {k: v for k, v in data.items() if k not in owner}
        flat: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if key in owner:
                flat.setdefault(owner[key], {})[key] = value
        for group, values in flat.items():
            held = out.get(group)
            if isinstance(held, BaseModel):
                held = held.model_dump()
            if held is None or isinstance(held, dict):
                out[group] = {**(held or {}), **values}  # a flat name wins over its group's entry
        return out

    @classmethod
    def groups(cls) -> dict[str, type[SettingsGroup]]:
        """Group field name -> its model, in declaration order."""
        return {name: _group_model(cls, name, field) for name, field in cls.model_fields.items()}

    @classmethod
    def group_of(cls) -> dict[str, str]:
        """Setting name -> the name of the group that holds it."""
        return cls._group_of

    @classmethod
    def flat_fields(cls) -> dict[str, FieldInfo]:
        """Every setting by its flat name, in declaration order."""
        return {name: field for group in cls.groups().values() for name, field in group.model_fields.items()}

    def flat(self) -> dict[str, Any]:
        """The settings by flat name: what `cls(**settings.flat())` rebuilds, and what a Serve config lists."""
        return {k: v for name in self.groups() for k, v in getattr(self, name).model_dump().items()}


def group_field(model: type[SettingsGroup]) -> Any:
    """The field of a group in a GroupedSettings class: by default, the group with its own defaults."""
    return Field(default_factory=model)


def _group_model(cls: type, name: str, field: FieldInfo) -> type[SettingsGroup]:
    model = field.annotation
    if not (isinstance(model, type) and issubclass(model, SettingsGroup)):
        raise TypeError(f"{cls.__name__}.{name} must be a SettingsGroup model, not {model!r}")
    return model


def _group_map(cls: type[GroupedSettings]) -> dict[str, str]:
    """Setting name -> group name; TypeError when a name is taken twice (two groups, or a group's own)."""
    owner: dict[str, str] = {}
    for group, model in cls.groups().items():
        for name in model.model_fields:
            if name in cls.model_fields:
                raise TypeError(f"{cls.__name__}: setting {name!r} of group {group!r} is named like a group")
            if name in owner:
                raise TypeError(f"{cls.__name__}: setting {name!r} is in groups {owner[name]!r} and {group!r}")
            owner[name] = group
    return owner
