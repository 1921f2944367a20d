"""Configuration: arguments beat environment variables beat config files beat defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    PyprojectTomlConfigSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["AgentEventsSettings", "load_settings"]

DEFAULT_BUS_URL = "memory://"
DEFAULT_STORE_URL = "sqlite+aiosqlite:///agentevents.db"


class AgentEventsSettings(BaseSettings):
    """Where the bus and the store are.

    Sources, first wins: ``AGENTEVENTS_BUS_URL`` / ``AGENTEVENTS_STORE_URL``;
    ``agentevents.toml`` in the working directory (top-level ``bus_url = ...``);
    ``[tool.agentevents]`` in ``pyproject.toml``; the embedded defaults.
    """

    model_config = SettingsConfigDict(
        env_prefix="AGENTEVENTS_",
        toml_file="agentevents.toml",
        pyproject_toml_table_header=("tool", "agentevents"),
        extra="ignore",
    )

    bus_url: str = DEFAULT_BUS_URL
    store_url: str = DEFAULT_STORE_URL

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, Path.cwd() / "agentevents.toml"),
            PyprojectTomlConfigSettingsSource(settings_cls, Path.cwd() / "pyproject.toml"),
        )


def load_settings() -> AgentEventsSettings:
    """Read the settings afresh (environment and files may change between calls)."""
    return AgentEventsSettings()
