"""The NATS JetStream bus backend (``nats://``, ``tls://``): plugin registration only.

Importing this module is cheap: the client library (``nats-py``, extra ``nats``) and the
transport in :mod:`agentevents.backends.nats.transport` are imported when a bus is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentevents.plugins.hookspecs import BackendInfo, hookimpl

if TYPE_CHECKING:
    from agentevents.core.transport import Transport

__all__ = ["agentevents_bus_backends"]


def _create(url: str) -> Transport:
    from agentevents.backends.nats.transport import NatsTransport

    return NatsTransport.from_url(url)


@hookimpl
def agentevents_bus_backends() -> list[BackendInfo]:
    """The JetStream bus: ``nats://`` and ``tls://``."""
    return [
        BackendInfo(
            name="nats",
            kind="bus",
            schemes=("nats", "tls"),
            factory=_create,
            requires=("nats",),
            extra="nats",
            description="NATS JetStream (stream per prefix, durable pull consumers per group)",
        )
    ]
