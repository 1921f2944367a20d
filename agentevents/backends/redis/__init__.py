"""The Redis Streams bus backend (``redis://``, ``rediss://``): plugin hook only.

Importing this module is cheap: ``redis`` is imported by the factory, when a bus is
created. The transport and its stream layout are documented in
:mod:`agentevents.backends.redis.transport`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentevents.plugins.hookspecs import BackendInfo, hookimpl

if TYPE_CHECKING:
    from agentevents.core.transport import Transport

__all__ = ["agentevents_bus_backends"]


def _create(url: str) -> Transport:
    from agentevents.backends.redis.transport import RedisTransport

    return RedisTransport.from_url(url)


@hookimpl
def agentevents_bus_backends() -> list[BackendInfo]:
    """The Redis Streams bus: ``redis://`` and ``rediss://`` (TLS)."""
    return [
        BackendInfo(
            name="redis",
            kind="bus",
            schemes=("redis", "rediss"),
            factory=_create,
            requires=("redis",),
            extra="redis",
            description="Redis Streams: consumer groups, XAUTOCLAIM redelivery (Redis >= 6.2)",
        )
    ]
