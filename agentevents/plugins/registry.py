"""Finds backends (entry points + explicit registration) and builds them from URLs."""

from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal

import pluggy

from agentevents.core.errors import ConfigurationError, MissingDependencyError, UnknownBackendError
from agentevents.core.urls import redact_url, url_scheme
from agentevents.plugins.hookspecs import PROJECT_NAME, AgentEventsSpec, BackendInfo

if TYPE_CHECKING:
    from types import ModuleType

    from agentevents.core.bus import Bus
    from agentevents.core.store import EventStore
    from agentevents.core.transport import Transport

__all__ = ["BackendRegistry", "create_bus", "create_store", "create_transport", "registry"]

log = logging.getLogger("agentevents.plugins")


class BackendRegistry:
    """A pluggy manager over the ``agentevents`` entry-point group, loaded on first use."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(AgentEventsSpec)
        self._loaded = False
        self._lock = threading.Lock()
        #: Entry points that failed to load: name -> "module: error" (shown by the CLI).
        self.broken: dict[str, str] = {}

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self._load_entry_points()
                self._loaded = True

    def _load_entry_points(self) -> None:
        """Load each plugin on its own: one broken plugin must not hide all the others."""
        for ep in entry_points(group=PROJECT_NAME):
            if self._pm.has_plugin(ep.name) or self._pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                self._pm.register(plugin, name=ep.name)
            except Exception as exc:
                self.broken[ep.name] = f"{ep.value}: {exc!r}"
                log.warning("agentevents plugin %r (%s) failed to load and is skipped: %r",
                            ep.name, ep.value, exc)

    def register(self, plugin: ModuleType | object, name: str | None = None) -> None:
        """Register a plugin in-process (tests, scripts); validated like an entry point."""
        self._pm.register(plugin, name=name)

    def unregister(self, plugin: ModuleType | object) -> None:
        """Remove a plugin registered with :meth:`register`."""
        self._pm.unregister(plugin)

    def backends(self, kind: Literal["bus", "store"] | None = None) -> list[BackendInfo]:
        """Every discovered backend, optionally of one kind."""
        self._ensure_loaded()
        found: list[BackendInfo] = []
        if kind in (None, "bus"):
            for batch in self._pm.hook.agentevents_bus_backends():
                found.extend(batch)
        if kind in (None, "store"):
            for batch in self._pm.hook.agentevents_store_backends():
                found.extend(batch)
        return found

    def plugin_of(self, info: BackendInfo) -> str:
        """The registered name of the plugin that provides ``info`` (for listings)."""
        for name, plugin in self._pm.list_name_plugin():
            for hook in ("agentevents_bus_backends", "agentevents_store_backends"):
                impl = getattr(plugin, hook, None)
                if impl is not None and info in impl():
                    return name
        return "?"

    def lookup(self, url: str, kind: Literal["bus", "store"]) -> BackendInfo:
        """The backend for ``url``'s scheme; clear errors when none or not installed."""
        scheme = url_scheme(url)
        if not scheme or "://" not in url:
            raise ConfigurationError(
                f"{redact_url(url)!r} is not a {kind} URL: it needs a scheme such as "
                f"'memory://' or 'sqlite+aiosqlite:///events.db'"
            )
        candidates = self.backends(kind)
        for info in candidates:
            if scheme in info.schemes:
                missing = info.missing()
                if missing:
                    raise MissingDependencyError(info.name, info.extra, missing[0])
                return info
        raise UnknownBackendError(
            scheme, kind, {s for info in candidates for s in info.schemes}
        )


#: The process-wide registry used by :func:`create_bus` and :func:`create_store`.
registry = BackendRegistry()


def create_transport(url: str) -> Transport:
    """The bus transport for ``url`` (no connection is made until first use)."""
    info = registry.lookup(url, "bus")
    transport: Transport = info.factory(url)
    return transport


def create_bus(url: str | None = None, **options: Any) -> Bus:
    """A :class:`~agentevents.core.bus.Bus` for ``url``.

    ``url`` defaults to ``AGENTEVENTS_BUS_URL``, then ``bus_url`` in ``agentevents.toml`` or
    ``[tool.agentevents]`` of ``pyproject.toml``, then ``memory://``. ``options`` are the
    bus's subscription defaults (``max_in_flight``, ``max_attempts``, ``ack_timeout``, ...).
    """
    from agentevents.core.bus import Bus
    from agentevents.core.settings import load_settings

    resolved = url or load_settings().bus_url
    return Bus(create_transport(resolved), url=resolved, **options)


def create_store(url: str | None = None) -> EventStore:
    """An :class:`~agentevents.core.store.EventStore` for ``url``.

    ``url`` defaults to ``AGENTEVENTS_STORE_URL``, then ``store_url`` in the config file,
    then a SQLite file ``agentevents.db`` in the working directory.
    """
    from agentevents.core.settings import load_settings

    resolved = url or load_settings().store_url
    info = registry.lookup(resolved, "store")
    store: EventStore = info.factory(resolved)
    return store
