"""The pluggy hook specifications every backend plugin implements.

A plugin is any module registered under the entry-point group ``agentevents`` (built-in
backends use the very same mechanism, see ``pyproject.toml``). It implements one or both
hooks with :data:`hookimpl`. The module must import cheaply: no broker client at import
time; :class:`BackendInfo.factory` imports it when a backend is actually created.

A minimal third-party bus plugin::

    from agentevents.plugins import BackendInfo, hookimpl

    def _create(url: str) -> "Transport":
        from mypkg.transport import MyTransport   # imported only when used
        return MyTransport.from_url(url)

    @hookimpl
    def agentevents_bus_backends() -> list[BackendInfo]:
        return [BackendInfo(name="mybroker", kind="bus", schemes=("mybroker",),
                            factory=_create, requires=("mybroker_client",), extra=None)]
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PROJECT_NAME", "BackendInfo", "hookimpl", "hookspec"]

#: The pluggy project name and the entry-point group plugins register under.
PROJECT_NAME = "agentevents"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorate a plugin's hook functions with this.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """How to build one backend, and what it needs installed."""

    #: Short unique name, e.g. ``"redis"``.
    name: str
    #: ``"bus"`` (factory returns a Transport) or ``"store"`` (factory returns an EventStore).
    kind: Literal["bus", "store"]
    #: URL schemes this backend handles, e.g. ``("redis", "rediss")``.
    schemes: tuple[str, ...]
    #: Builds the backend from its URL; imports the client library lazily.
    factory: Callable[[str], Any]
    #: Top-level modules that must be importable (the client library).
    requires: tuple[str, ...] = ()
    #: The ``agentevents[...]`` extra that installs ``requires`` (``None``: not ours).
    extra: str | None = None
    #: One line for ``agentevents backends``.
    description: str = ""

    def missing(self) -> list[str]:
        """Required modules that cannot be imported here."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    @property
    def installed(self) -> bool:
        """Whether every required client library is importable."""
        return not self.missing()


class AgentEventsSpec:
    """Hook specifications; bodiless, documented, validated by pluggy at registration."""

    @hookspec
    def agentevents_bus_backends(self) -> list[BackendInfo]:  # type: ignore[empty-body]
        """Return the bus backends (``kind="bus"``) this plugin provides."""

    @hookspec
    def agentevents_store_backends(self) -> list[BackendInfo]:  # type: ignore[empty-body]
        """Return the event-store backends (``kind="store"``) this plugin provides."""
