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
import uuid
from collections.abc import Iterator

import pytest
from services import NATS_URL, probe_nats, require

from agentevents.conformance_tests.test_bus import *  # noqa: F403

require("NATS", NATS_URL, probe_nats)

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
