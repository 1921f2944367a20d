"""PostgreSQL LISTEN/NOTIFY: followers wake when *another* store object (another pool, or
process) appends, well before their poll timeout; the listener reconnects and closes.

Followers here wait with a 30 s timeout and the tests are bounded at 5 s: an event can only
arrive in time through the notification, not by polling. Each test uses its own table
prefix and drops its tables. PostgreSQL not reachable: skipped on a laptop, failed in CI.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import pytest_asyncio
from services import SQL_SERVERS, require, sql_tables

from agentevents.conformance_tests.helpers import poll
from agentevents.core.event import Event
from agentevents.core.store import RecordedEvent
from agentevents.stores.sql.listen import application_name
from agentevents.stores.sql.store import SqlEventStore

PG_URL = SQL_SERVERS["postgresql"][2]
#: Longer than any test may take: a follower woken in time was woken by NOTIFY.
POLL_TIMEOUT = 30.0
BOUND = 5.0


async def _probe() -> None:
    import asyncpg

    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=3)
    await conn.close()


require("POSTGRESQL", "127.0.0.1:5432", _probe)


@pytest_asyncio.fixture
async def url() -> AsyncIterator[str]:
    url = f"{PG_URL}?table_prefix=t_{uuid.uuid4().hex[:10]}_"
    async with sql_tables(url):
        yield url


@pytest_asyncio.fixture
async def stores(url: str) -> AsyncIterator[tuple[SqlEventStore, SqlEventStore]]:
    """Two store objects on the same tables, each with its own connection pool."""
    a, b = SqlEventStore(url), SqlEventStore(url)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _event(n: int) -> Event:
    return Event(type="notify.test", source="tester", payload={"n": n})


async def _listen_pids(channel: str) -> list[int]:
    """Backend pids of the LISTEN connections of ``channel``."""
    import asyncpg

    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            application_name(channel),
        )
        return [row["pid"] for row in rows]
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_follower_on_one_store_object_wakes_on_anothers_append(
    stores: tuple[SqlEventStore, SqlEventStore],
) -> None:
    follower_store, writer = stores
    head = await follower_store.head_position()
    got: list[RecordedEvent] = []
    first_read = asyncio.Event()
    arrived = asyncio.Event()

    async def follow() -> None:
        subscription = follower_store.subscribe(head, idle_timeout=POLL_TIMEOUT,
                                                initial_wait=POLL_TIMEOUT)
        async with aclosing(subscription) as events:
            first_read.set()
            async for recorded in events:
                got.append(recorded)
                arrived.set()

    follower = asyncio.create_task(follow())
    try:
        await first_read.wait()
        await asyncio.sleep(0.3)  # the follower has read (nothing) and waits 30 s
        async with asyncio.timeout(BOUND):
            appended = await writer.append("s", [_event(1)])
            await arrived.wait()
        assert got == appended
        arrived.clear()
        await asyncio.sleep(0.2)  # waiting again, with the listener long established
        async with asyncio.timeout(BOUND):
            appended += await writer.append("s", [_event(2), _event(3)])
            while len(got) < 3:
                await arrived.wait()
                arrived.clear()
        assert got == appended
    finally:
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower


@pytest.mark.asyncio
async def test_wait_for_append_wakes_on_another_store_objects_append(
    stores: tuple[SqlEventStore, SqlEventStore],
) -> None:
    waiter_store, writer = stores
    head = await waiter_store.head_position()
    await waiter_store.wait_for_append(head + 10**9, 0.01)  # opens the listener
    waiter = asyncio.create_task(waiter_store.wait_for_append(head, POLL_TIMEOUT))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    async with asyncio.timeout(BOUND):
        await writer.append("s", [_event(1)])
        await waiter


@pytest.mark.asyncio
async def test_listener_reconnects_after_losing_its_connection(
    stores: tuple[SqlEventStore, SqlEventStore],
) -> None:
    waiter_store, writer = stores
    channel = f"{waiter_store.table_prefix}appended"
    head = await waiter_store.head_position()
    await waiter_store.wait_for_append(head, 0.2)  # opens the listener
    pids = await poll(lambda: _listen_pids(channel), bool, BOUND, what="a LISTEN connection")
    assert len(pids) == 1, "one LISTEN connection per store object"

    import asyncpg

    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0])
    finally:
        await admin.close()
    # An append while the listener is down is found by the head read after reconnecting.
    appended = await writer.append("s", [_event(1)])
    async with asyncio.timeout(BOUND):
        await waiter_store.wait_for_append(head, POLL_TIMEOUT)
    await poll(lambda: _listen_pids(channel), lambda new: new not in ([], pids), BOUND,
               what="a new LISTEN connection")
    waiter = asyncio.create_task(
        waiter_store.wait_for_append(appended[-1].position, POLL_TIMEOUT)
    )
    await asyncio.sleep(0.1)
    async with asyncio.timeout(BOUND):
        await writer.append("s", [_event(2)])
        await waiter


@pytest.mark.asyncio
async def test_close_ends_the_listen_connection(url: str) -> None:
    store = SqlEventStore(url)
    channel = f"{store.table_prefix}appended"
    await store.wait_for_append(0, 0.01)
    await poll(lambda: _listen_pids(channel), bool, BOUND, what="a LISTEN connection")
    await store.close()
    await poll(lambda: _listen_pids(channel), lambda pids: not pids, BOUND,
               what="the LISTEN connection to end")
