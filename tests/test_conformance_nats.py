"""The shipped bus conformance suite, run against the real NATS JetStream server.

The server comes from ``AGENTEVENTS_NATS_URL`` (default ``nats://127.0.0.1:4222``). Each
session uses its own stream and subject prefix and deletes both streams at the end, so
runs can share a server. Unreachable server: the module is skipped on a laptop and fails
in CI (``CI=true``).

Skipped by capability (JetStream truly lacks it): ``ordered_per_key`` -- a pull consumer
spreads one key's events over the members of a group, so per-key order holds only within
one member (the core's lanes), not across members.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from agentevents.conformance_tests.test_bus import *  # noqa: F403

NATS_URL = os.environ.get("AGENTEVENTS_NATS_URL", "nats://127.0.0.1:4222")


async def _probe(url: str) -> None:
    import nats

    from agentevents.backends.nats.transport import NatsConfig

    host, _, port = NatsConfig.from_url(url).servers[0].split("://", 1)[1].rpartition(":")
    _reader, writer = await asyncio.open_connection(host, int(port))  # fails fast and clearly
    writer.close()
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False,
                            max_reconnect_attempts=0)
    try:
        await nc.jetstream().account_info()  # JetStream enabled?
    finally:
        await nc.close()


def _check_reachable() -> None:
    try:
        asyncio.run(asyncio.wait_for(_probe(NATS_URL), 5))
    except Exception as exc:
        message = f"NATS NOT REACHABLE at {NATS_URL}: {exc!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


_check_reachable()

_SESSION = uuid.uuid4().hex[:10]
STREAM = f"CONF_{_SESSION}"
PREFIX = f"conf{_SESSION}"


async def _delete_streams() -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for name in (STREAM, f"{STREAM}_DLQ"):
            with contextlib.suppress(Exception):  # never created: nothing to delete
                await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture(scope="session")
def bus_url() -> Iterator[str]:
    yield f"{NATS_URL}?stream={STREAM}&prefix={PREFIX}"
    asyncio.run(_delete_streams())
