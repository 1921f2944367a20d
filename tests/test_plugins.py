"""Discovery through entry points, URL selection, errors that say what to do, settings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from agentevents import (
    Bus,
    ConfigurationError,
    MissingDependencyError,
    UnknownBackendError,
    create_bus,
)
from agentevents.backends.memory import MemoryTransport
from agentevents.core.settings import load_settings
from agentevents.core.urls import redact_url
from agentevents.plugins import BackendInfo, hookimpl, registry
from agentevents.plugins.registry import BackendRegistry

PLUGIN_SOURCE = '''
"""A throwaway third-party bus plugin: it reuses the memory transport under its own scheme."""
from agentevents.plugins import BackendInfo, hookimpl

def _create(url):
    from agentevents.backends.memory import MemoryTransport
    return MemoryTransport(name="throwaway")

@hookimpl
def agentevents_bus_backends():
    return [BackendInfo(name="throwaway", kind="bus", schemes=("throwaway",), factory=_create,
                        description="a plugin installed by a test")]
'''


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Path:
    """A plugin 'installed' the way pip does: a module plus dist-info with entry_points.txt."""
    (tmp_path / "throwaway_plugin.py").write_text(PLUGIN_SOURCE)
    dist = tmp_path / "throwaway_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[agentevents]\nthrowaway = throwaway_plugin\n")
    return tmp_path


def test_builtin_backends_register_through_entry_points() -> None:
    fresh = BackendRegistry()
    names = {info.name for info in fresh.backends()}
    assert "memory" in names
    # Built-ins come from the entry-point group, like any third party's plugin.
    plugin_names = {name for name, _ in fresh._pm.list_name_plugin()}
    assert "memory" in plugin_names


def test_entry_point_plugin_is_discovered_without_touching_core(
    installed_plugin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(installed_plugin))
    fresh = BackendRegistry()
    info = fresh.lookup("throwaway://anything", "bus")
    assert info.name == "throwaway"
    transport = info.factory("throwaway://anything")
    assert isinstance(transport, MemoryTransport)
    assert transport.broker.name == "throwaway"


def test_cli_lists_an_entry_point_plugin(installed_plugin: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed_plugin)}
    out = subprocess.run(
        [sys.executable, "-m", "agentevents.cli", "backends"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    ).stdout
    assert "throwaway" in out
    assert "memory" in out


def test_a_broken_plugin_does_not_hide_the_others(tmp_path: Path) -> None:
    (tmp_path / "broken_plugin.py").write_text("import surely_not_installed_client_xyz\n")
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[agentevents]\nbroken = broken_plugin\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "agentevents.cli", "backends"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    )
    assert "memory" in result.stdout
    assert "broken plugin" in result.stdout
    assert "surely_not_installed_client_xyz" in result.stdout


def test_in_process_registration() -> None:
    module = ModuleType("inproc_plugin")

    @hookimpl
    def agentevents_bus_backends() -> list[BackendInfo]:
        return [BackendInfo(name="inproc", kind="bus", schemes=("inproc",),
                            factory=lambda url: MemoryTransport(name="inproc"))]

    module.agentevents_bus_backends = agentevents_bus_backends  # type: ignore[attr-defined]
    registry.register(module)
    try:
        bus = create_bus("inproc://")
        assert isinstance(bus, Bus)
        assert isinstance(bus.transport, MemoryTransport)
    finally:
        registry.unregister(module)
    with pytest.raises(UnknownBackendError):
        create_bus("inproc://")


def test_unknown_scheme_names_installed_schemes() -> None:
    with pytest.raises(UnknownBackendError) as info:
        create_bus("carrierpigeon://coop")
    message = str(info.value)
    assert "'carrierpigeon'" in message
    assert "memory" in message
    assert "agentevents backends" in message


def test_missing_client_library_names_the_extra() -> None:
    module = ModuleType("needs_client")

    @hookimpl
    def agentevents_bus_backends() -> list[BackendInfo]:
        return [BackendInfo(name="fancy", kind="bus", schemes=("fancy",), extra="fancy",
                            requires=("surely_not_installed_client_xyz",),
                            factory=lambda url: MemoryTransport())]

    module.agentevents_bus_backends = agentevents_bus_backends  # type: ignore[attr-defined]
    registry.register(module)
    try:
        with pytest.raises(MissingDependencyError, match=r"pip install 'agentevents\[fancy\]'"):
            create_bus("fancy://user:hunter2@host")
        info = next(i for i in registry.backends("bus") if i.name == "fancy")
        assert not info.installed
    finally:
        registry.unregister(module)


def test_url_without_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="needs a scheme"):
        create_bus("localhost:6379")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:hunter2@host", "redis://:***@host"),
        ("nats://s3cr3ttoken@host:4222", "nats://***@host:4222"),
        (
            "postgresql+asyncpg://app:pw@db/test?sslmode=require",
            "postgresql+asyncpg://app:***@db/test?sslmode=require",
        ),
        ("eventbridge://?region=eu-west-1&aws_secret_access_key=abc&x=1",
         "eventbridge://?region=eu-west-1&aws_secret_access_key=***&x=1"),
        ("memory://", "memory://"),
        ("postgresql+asyncpg://user:p@ss@db/x", "postgresql+asyncpg://user:***@db/x"),
        ("redis://:se/cret@host", "redis://:***@host"),
        ("x://h/?pass=1&auth=2&sig=3&key=4&region=eu",
         "x://h/?pass=***&auth=***&sig=***&key=***&region=eu"),
        ("sqlite+aiosqlite:///data/a@b.db", "sqlite+aiosqlite:///data/a@b.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


def test_secrets_never_appear_in_bus_repr_or_errors() -> None:
    bus = Bus(MemoryTransport(), url="memory://user:hunter2@x")
    assert "hunter2" not in repr(bus)
    with pytest.raises(UnknownBackendError) as info:
        create_bus("carrier://user:hunter2@host")
    assert "hunter2" not in str(info.value)


def test_importing_agentevents_imports_no_broker_client() -> None:
    code = textwrap.dedent(
        """
        import sys, agentevents, agentevents.plugins
        agentevents.plugins.registry.backends()
        clients = ["redis", "nats", "aiokafka", "aioboto3", "aiobotocore", "asyncpg", "asyncmy",
                   "aiomysql", "pytest"]
        loaded = [name for name in clients if name in sys.modules]
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- settings ---------------------------------------------------------------------------


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENTEVENTS_BUS_URL", raising=False)
    monkeypatch.delenv("AGENTEVENTS_STORE_URL", raising=False)
    assert load_settings().bus_url == "memory://"
    assert load_settings().store_url.startswith("sqlite+aiosqlite:///")

    (tmp_path / "pyproject.toml").write_text(
        '[tool.agentevents]\nbus_url = "memory://from-pyproject"\n'
        'store_url = "memory://store-from-pyproject"\n'
    )
    assert load_settings().bus_url == "memory://from-pyproject"

    (tmp_path / "agentevents.toml").write_text('bus_url = "memory://from-toml"\n')
    assert load_settings().bus_url == "memory://from-toml"
    assert load_settings().store_url == "memory://store-from-pyproject"

    monkeypatch.setenv("AGENTEVENTS_BUS_URL", "memory://from-env")
    assert load_settings().bus_url == "memory://from-env"
    bus = create_bus()
    assert isinstance(bus.transport, MemoryTransport)
    assert bus.transport.broker.name == "from-env"
    assert create_bus("memory://explicit").transport.broker.name == "explicit"  # type: ignore[attr-defined]


def test_memory_url_options_are_validated() -> None:
    transport = MemoryTransport.from_url("memory://opts?max_payload_bytes=2048&max_retained=10")
    assert transport.capabilities.max_payload_bytes == 2048
    with pytest.raises(ConfigurationError, match="unknown option"):
        MemoryTransport.from_url("memory://x?maxlen=3")
    with pytest.raises(ConfigurationError):
        MemoryTransport.from_url("memory://x?max_retained=lots")
