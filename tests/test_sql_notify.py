"""PostgreSQL LISTEN/NOTIFY: followers wake when *another* store object (another pool, or
process) appends, well before their poll timeout; the channel is per table prefix *and*
schema; the listener reconnects, and neither closing nor reconnecting waits on a network
that swallows packets.

Followers here wait with a 30 s timeout and the tests are bounded at 5 s: an event can only
arrive in time through the notification, not by polling. The tests wait for conditions
(the listener's connection number, a task being blocked), never for a fixed time. Each test
uses its own table prefix (and schemas) and drops them. PostgreSQL not reachable: skipped
on a laptop, failed in CI.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import pytest_asyncio
from services import SQL_SERVERS, require, sql_tables

from agentevents.conformance_tests.helpers import poll
from agentevents.core.event import Event
from agentevents.core.store import RecordedEvent
from agentevents.stores.sql import listen
from agentevents.stores.sql.listen import (
    MAX_CHANNEL_BYTES,
    AppendListener,
    application_name,
    channel_name,
)
from agentevents.stores.sql.store import SqlEventStore

PG_URL = SQL_SERVERS["postgresql"][2]
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
#: Longer than any test may take: a follower woken in time was woken by NOTIFY.
POLL_TIMEOUT = 30.0
BOUND = 5.0


async def _probe() -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN, timeout=3)
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


def _listener(store: SqlEventStore) -> AppendListener:
    assert store._listener is not None
    return store._listener


async def _listening(store: SqlEventStore, after: int = 0) -> int:
    """Start the store's listener if needed; wait until its connection number ``after + 1``
    (or later) is listening and has reported the head; return that number."""
    await store.wait_for_append(10**12, 0)  # starts the listener, waits for nothing
    async with asyncio.timeout(BOUND):
        return await _listener(store).wait_connected(after)


def _calls_to_wait(store: SqlEventStore, monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[int]:
    """A queue that gets the ``after_position`` of every ``store.wait_for_append`` call,
    as it starts waiting."""
    calls: asyncio.Queue[int] = asyncio.Queue()
    original = store.wait_for_append

    async def wait_for_append(after_position: int, timeout: float) -> None:
        calls.put_nowait(after_position)
        await original(after_position, timeout)

    monkeypatch.setattr(store, "wait_for_append", wait_for_append)
    return calls


async def _blocked(task: asyncio.Task[None]) -> None:
    """Let ``task`` run until it blocks; it must still be waiting then."""
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done(), "the waiter returned before anything was appended"


async def _listen_pids(channel: str) -> list[int]:
    """Backend pids of the LISTEN connections of ``channel``."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
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
    stores: tuple[SqlEventStore, SqlEventStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    follower_store, writer = stores
    head = await follower_store.head_position()
    await _listening(follower_store)
    waits = _calls_to_wait(follower_store, monkeypatch)
    got: list[RecordedEvent] = []
    arrived = asyncio.Event()

    async def follow() -> None:
        subscription = follower_store.subscribe(head, idle_timeout=POLL_TIMEOUT,
                                                initial_wait=POLL_TIMEOUT)
        async with aclosing(subscription) as events:
            async for recorded in events:
                got.append(recorded)
                arrived.set()

    follower = asyncio.create_task(follow())
    try:
        # The follower has read (nothing) and waits 30 s for the next append.
        async with asyncio.timeout(BOUND):
            assert await waits.get() == head
        await _blocked(follower)
        async with asyncio.timeout(BOUND):
            appended = await writer.append("s", [_event(1)])
            await arrived.wait()
        assert got == appended
        arrived.clear()
        async with asyncio.timeout(BOUND):  # waiting again, the listener long established
            assert await waits.get() == appended[-1].position
        await _blocked(follower)
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
    await _listening(waiter_store)
    waiter = asyncio.create_task(waiter_store.wait_for_append(head, POLL_TIMEOUT))
    await _blocked(waiter)
    async with asyncio.timeout(BOUND):
        await writer.append("s", [_event(1)])
        await waiter


@pytest.mark.asyncio
async def test_listener_reconnects_after_losing_its_connection(
    stores: tuple[SqlEventStore, SqlEventStore],
) -> None:
    waiter_store, writer = stores
    listener = _listener(waiter_store)
    head = await waiter_store.head_position()
    first = await _listening(waiter_store)
    pids = await _listen_pids(listener.channel)
    assert len(pids) == 1, "one LISTEN connection per store object"

    import asyncpg

    admin = await asyncpg.connect(PG_DSN)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0])
    finally:
        await admin.close()
    # An append while the listener is down is found by the head read after reconnecting
    # (or by its notification, if the new connection listens already).
    appended = await writer.append("s", [_event(1)])
    second = await _listening(waiter_store, after=first)
    async with asyncio.timeout(BOUND):
        await waiter_store.wait_for_append(head, POLL_TIMEOUT)
    assert waiter_store._seen_head == appended[-1].position
    assert set(await _listen_pids(listener.channel)) - set(pids), "a new LISTEN connection"
    # And the new connection receives notifications.
    waiter = asyncio.create_task(
        waiter_store.wait_for_append(appended[-1].position, POLL_TIMEOUT)
    )
    await _blocked(waiter)
    async with asyncio.timeout(BOUND):
        await writer.append("s", [_event(2)])
        await waiter
    assert listener.connections == second, "no reconnect in between"


@pytest.mark.asyncio
async def test_close_ends_the_listen_connection(url: str) -> None:
    store = SqlEventStore(url)
    await _listening(store)
    channel = _listener(store).channel
    assert await _listen_pids(channel)
    await store.close()
    # The server ends the backend once it sees the socket closed.
    await poll(lambda: _listen_pids(channel), lambda pids: not pids, BOUND,
               what="the LISTEN connection to end")


# -- one channel per prefix and schema ----------------------------------------------------------


def test_the_channel_names_prefix_and_schema_within_postgresqls_limit() -> None:
    longest_prefix = "p" * 40
    schemas = ["public", "tenant_a", "tenant_b", "é" * 31, "x" * 63]
    channels = [channel_name(longest_prefix, schema) for schema in schemas]
    assert len(set(channels)) == len(schemas)
    assert all(len(c.encode()) <= MAX_CHANNEL_BYTES for c in channels)
    assert all(c.startswith(f"{longest_prefix}appended_") for c in channels)
    assert channel_name("a_", "public") != channel_name("b_", "public")
    assert channel_name("a_", "public") == channel_name("a_", "public")  # stable


@pytest_asyncio.fixture
async def tenants() -> AsyncIterator[tuple[str, str, str]]:
    """Two schemas with the same table prefix in each: (prefix, schema a, schema b)."""
    import asyncpg

    unique = uuid.uuid4().hex[:10]
    prefix, schemas = f"t_{unique}_", (f"tenant_{unique}_a", f"tenant_{unique}_b")
    admin = await asyncpg.connect(PG_DSN)
    try:
        for schema in schemas:
            await admin.execute(f'CREATE SCHEMA "{schema}"')
        for schema in schemas:
            store = _tenant_store(prefix, schema)
            try:
                await store.create_schema()
            finally:
                await store.close()
        yield prefix, *schemas
    finally:
        for schema in schemas:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def _tenant_store(prefix: str, schema: str) -> SqlEventStore:
    """A store whose tables are those of ``prefix`` in ``schema`` (by its search_path)."""
    return SqlEventStore(f"{PG_URL}?table_prefix={prefix}", engine_options={
        "connect_args": {"server_settings": {"search_path": schema}}})


@pytest.mark.asyncio
async def test_tenants_in_two_schemas_with_one_prefix_do_not_wake_each_other(
    tenants: tuple[str, str, str],
) -> None:
    prefix, schema_a, schema_b = tenants
    follower_a, writer_a, writer_b = (_tenant_store(prefix, schema)
                                      for schema in (schema_a, schema_a, schema_b))
    try:
        await _listening(follower_a)
        # B runs ahead: positions 1..5 in B, then 1 in A. Notifications reach a listener in
        # commit order, so a follower of A that heard B would have seen position 5 first.
        in_b = await writer_b.append("s", [_event(n) for n in range(5)])
        in_a = await writer_a.append("s", [_event(9)])
        assert [r.position for r in in_b][-1] == 5
        assert [r.position for r in in_a] == [1]
        async with asyncio.timeout(BOUND):
            await follower_a.wait_for_append(0, POLL_TIMEOUT)
        assert follower_a._seen_head == 1, "the follower of schema A heard schema B's append"
        # The appender and the listener of a schema name the same channel; the schemas not.
        assert writer_a._channel == _listener(follower_a).channel
        assert writer_b._channel != writer_a._channel
        assert await follower_a.read_all() == in_a
    finally:
        for store in (follower_a, writer_a, writer_b):
            await store.close()


# -- a network that swallows packets ----------------------------------------------------------


class Blackhole:
    """A TCP proxy to PostgreSQL that can stop forwarding anything, in both directions,
    while keeping every connection open: a network that swallows packets (a cable pulled,
    a firewall dropping). New connections are accepted (and counted) even then.

    :meth:`pause` stops every connection; with ``stall_after_startup``, each new connection
    stops by itself once the server said it is ready (after authentication): a server that
    accepts a connection, then never answers again.
    """

    def __init__(self) -> None:
        self.accepted = 0
        self.stall_after_startup = False
        self._paused = False
        self._gates: list[asyncio.Event] = []
        self._accept = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        self._paused = True
        for gate in self._gates:
            gate.clear()

    def resume(self) -> None:
        self._paused = False
        for gate in self._gates:
            gate.set()

    async def accepted_at_least(self, count: int) -> None:
        while self.accepted < count:
            self._accept.clear()
            await self._accept.wait()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._accept.set()
        gate = asyncio.Event()
        if not self._paused:
            gate.set()
        self._gates.append(gate)
        host, port, _ = SQL_SERVERS["postgresql"]
        up_reader, up_writer = await asyncio.open_connection(host, port)
        self._writers += [writer, up_writer]
        stall = self.stall_after_startup
        for task in (self._pump(reader, up_writer, gate, stall=False),
                     self._pump(up_reader, writer, gate, stall=stall)):
            self._tasks.add(asyncio.create_task(task))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    gate: asyncio.Event, *, stall: bool) -> None:
        try:
            while True:
                await gate.wait()
                data = await source.read(65536)
                await gate.wait()  # read while paused: held, end of stream too
                if not data:
                    break
                sink.write(data)
                await sink.drain()
                if stall and READY_FOR_QUERY in data:  # the server said it is ready
                    gate.clear()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()


#: PostgreSQL's ReadyForQuery message (idle), which ends the startup of a connection.
READY_FOR_QUERY = b"Z\x00\x00\x00\x05I"


@pytest_asyncio.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    proxy = Blackhole()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def _through(proxy: Blackhole, url: str) -> str:
    return url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")


@pytest.mark.asyncio
async def test_close_does_not_wait_for_a_network_that_swallows_packets(
    url: str, blackhole: Blackhole
) -> None:
    store = SqlEventStore(_through(blackhole, url))
    try:
        await _listening(store)
        blackhole.pause()
        started = time.monotonic()
        async with asyncio.timeout(listen.CLOSE_TIMEOUT + 3):
            await store.close()
        assert time.monotonic() - started < listen.CLOSE_TIMEOUT + 1
    finally:
        blackhole.resume()
        await store.close()


@pytest.mark.asyncio
async def test_a_reconnect_does_not_wait_for_the_lost_connection_to_close(
    url: str, blackhole: Blackhole, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listen, "HEALTH_CHECK_INTERVAL", 0.2)
    monkeypatch.setattr(listen, "HEALTH_CHECK_TIMEOUT", 0.2)
    store, writer = SqlEventStore(_through(blackhole, url)), SqlEventStore(url)
    try:
        first = await _listening(store)
        connections = blackhole.accepted
        blackhole.pause()
        # The health check times out, the silent connection is dropped (bounded), and the
        # listener tries again at once: a new connection reaches the (still paused) proxy.
        async with asyncio.timeout(0.2 + 0.2 + listen.CLOSE_TIMEOUT + 2):
            await blackhole.accepted_at_least(connections + 1)
        assert not _listener(store).connected
        blackhole.resume()
        await _listening(store, after=first)
        waiter = asyncio.create_task(store.wait_for_append(store._seen_head, POLL_TIMEOUT))
        await _blocked(waiter)
        async with asyncio.timeout(BOUND):
            await writer.append("s", [_event(1)])
            await waiter
    finally:
        blackhole.resume()
        await store.close()
        await writer.close()


@pytest.mark.asyncio
async def test_a_reconnect_to_a_server_that_stops_answering_is_given_up_and_retried(
    url: str, blackhole: Blackhole, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener lost its connection; the new one authenticates, then the server never
    answers again. Setting it up is bounded: the listener gives up on it and tries again,
    rather than waiting for ever (nothing but TCP keepalive would end that wait)."""
    monkeypatch.setattr(listen, "CONNECT_TIMEOUT", 0.5)
    store = SqlEventStore(_through(blackhole, url))
    try:
        listener = _listener(store)
        first = await _listening(store)
        blackhole.stall_after_startup = True
        pids = await _listen_pids(listener.channel)
        connections = blackhole.accepted

        import asyncpg

        admin = await asyncpg.connect(PG_DSN)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0])
        finally:
            await admin.close()
        # Two attempts that stall: the first was given up.
        async with asyncio.timeout(2 * (0.5 + listen.CLOSE_TIMEOUT) + 3):
            await blackhole.accepted_at_least(connections + 2)
        assert not listener.connected
        blackhole.stall_after_startup = False
        blackhole.resume()
        await _listening(store, after=first)
        started = time.monotonic()
        await store.close()
        assert time.monotonic() - started < listen.CLOSE_TIMEOUT + 1
    finally:
        blackhole.resume()
        await store.close()
