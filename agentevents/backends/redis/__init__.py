"""The Redis Streams bus backend (``redis://``, ``rediss://``): plugin hook only.

One URL form serves a single server and a Redis Cluster::

    redis://[[user]:password@]host[:port][/db][?prefix=agentevents&cluster=auto&...]
    rediss://...?ssl_ca_certs=ca.pem&ssl_certfile=client.pem&ssl_keyfile=client.key

``cluster=auto`` (the default) asks the server once (``INFO cluster``): a URL naming any
node of a cluster works as it is, and the other nodes are found from it. ``cluster=true``
or ``false`` skips the question. On a cluster every key of a namespace carries the hash tag
``{<prefix>}`` (``{agentevents}:stream:order.placed``), so a namespace lives in one slot:
multi-stream reads and pipelines stay on one node, and a cluster spreads namespaces, not
event types, over its nodes. ``rediss://`` is TLS, with the certificate options redis-py's
URLs use. Importing this module is cheap: ``redis`` is imported by the factory, when a bus
is created. The options, the key layout and the trade-offs are documented in
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
    """The Redis Streams bus: ``redis://`` and ``rediss://`` (TLS), one server or a cluster."""
    return [
        BackendInfo(
            name="redis",
            kind="bus",
            schemes=("redis", "rediss"),
            factory=_create,
            requires=("redis",),
            extra="redis",
            description="Redis Streams: consumer groups, XAUTOCLAIM redelivery (Redis >= 6.2); "
            "single server or Redis Cluster",
        )
    ]
