"""The SQL store's outbox on SQLite, PostgreSQL and MariaDB: outbox rows are written in the
append's transaction (a failed append writes none, and an append whose outbox row cannot be
written stores no event); the outbox is a setting of the tables, which every writer obeys
whatever its URL, enabled only explicitly; relays draining it through the lease; a stored
row that cannot be read stops the relay there, saying which and what to do.

Each test uses its own table prefix and drops its tables. A server that cannot be reached
skips its tests loudly on a laptop and fails them under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from services import SQL_SERVERS, sql_base, sql_tables
from sqlalchemy import delete, select, text, update
from test_relay import RecordingTransport

from agentevents.backends.memory import MemoryTransport
from agentevents.conformance_tests.helpers import wait_for
from agentevents.core.bus import Bus
from agentevents.core.errors import (
    ConcurrencyError,
    ConfigurationError,
    CorruptEventError,
    DuplicateEventError,
    OutboxNotEnabledError,
    OutboxNotInTablesError,
    RelayNameError,
    StoreError,
)
from agentevents.core.event import Event
from agentevents.core.outbox import Lease, Outbox
from agentevents.core.store import NO_STREAM
from agentevents.relay import OutboxRelay
from agentevents.stores.sql.store import OUTBOX_SETTING_TTL, SqlEventStore


def _base(kind: str, tmp_path: Path) -> str:
    return sql_base(kind, tmp_path, "run the outbox tests")


@pytest_asyncio.fixture(params=["sqlite", *sorted(SQL_SERVERS)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh table prefix on each database, with the outbox on; dropped afterwards."""
    url = f"{_base(request.param, tmp_path)}?table_prefix=t_{uuid.uuid4().hex[:10]}_&outbox=true"
    async with sql_tables(url):  # create_schema() with ?outbox=true enables it
        yield url


@pytest_asyncio.fixture(params=["sqlite", *sorted(SQL_SERVERS)])
async def plain_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh table prefix on each database, created without the outbox; dropped after."""
    url = f"{_base(request.param, tmp_path)}?table_prefix=t_{uuid.uuid4().hex[:10]}_"
    async with sql_tables(url):
        yield url


@pytest_asyncio.fixture
async def store(url: str) -> AsyncIterator[SqlEventStore]:
    store = SqlEventStore(url)
    try:
        yield store
    finally:
        await store.close()


def _event(n: int = 0, key: str | None = None) -> Event:
    return Event(type="outbox.test", source="tester", key=key, payload={"n": n})


async def _outbox_rows(store: SqlEventStore) -> list[int]:
    """The positions in the outbox table, read with SQL, not through the store's methods."""
    outbox = store._tables.outbox
    async with store._engine.connect() as conn:
        return list(await conn.scalars(select(outbox.c.position).order_by(outbox.c.position)))


@pytest.mark.asyncio
async def test_append_writes_one_outbox_row_per_event(store: SqlEventStore) -> None:
    assert store.outbox_enabled
    assert isinstance(store, Outbox)
    recorded = await store.append("a", [_event(1), _event(2)])
    recorded += await store.append("b", [_event(3)])
    assert await _outbox_rows(store) == [r.position for r in recorded]
    assert await store.read_outbox(10) == recorded


@pytest.mark.asyncio
async def test_failed_appends_write_no_outbox_rows(store: SqlEventStore) -> None:
    first = _event(1)
    recorded = await store.append("s", [first], expected_version=NO_STREAM)
    with pytest.raises(ConcurrencyError):
        await store.append("s", [_event(2)], expected_version=NO_STREAM)
    with pytest.raises(DuplicateEventError):
        await store.append("t", [_event(3), first])
    assert await _outbox_rows(store) == [r.position for r in recorded]
    assert await store.head_position() == recorded[-1].position


@pytest.mark.asyncio
async def test_no_event_is_stored_when_its_outbox_row_cannot_be(store: SqlEventStore) -> None:
    """The other half of atomicity: the outbox insert fails, so the append stores nothing."""
    before = await store.append("s", [_event(1)])
    async with store._engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE {store._tables.outbox.name}"))
    with pytest.raises(StoreError):
        await store.append("s", [_event(2), _event(3)])
    assert await store.read_stream("s") == before
    assert await store.head_position() == before[-1].position


# -- the outbox is a setting of the tables --------------------------------------------------


@pytest.mark.asyncio
async def test_writers_without_the_option_record_into_tables_with_the_outbox(
    url: str, store: SqlEventStore
) -> None:
    """Whatever a writer's URL says, appends to tables with the outbox are recorded, so
    the relay publishes them (a writer without ``?outbox=true`` used to bypass it)."""
    writers = [SqlEventStore(url.replace("&outbox=true", "")),
               SqlEventStore(url, outbox=False)]  # the argument wins over ?outbox=true
    transport = RecordingTransport(f"sqlrelay-{uuid.uuid4().hex}")
    bus = Bus(transport)
    try:
        assert not any(writer.outbox_enabled for writer in writers)  # not read yet
        recorded = []
        for n, writer in enumerate(writers):
            recorded += await writer.append(f"s{n}", [_event(n), _event(n)])
        assert await _outbox_rows(store) == [r.position for r in recorded]
        assert all(writer.outbox_enabled for writer in writers)  # found on in the tables
        assert await writers[0].read_outbox(10) == recorded
        assert await OutboxRelay(store, bus).run_once() == len(recorded)
        assert transport.sent_ids() == [str(r.event.id) for r in recorded]
    finally:
        await bus.close()
        for writer in writers:
            await writer.close()


@pytest.mark.asyncio
async def test_tables_without_the_outbox_refuse_a_store_that_needs_it(plain_url: str) -> None:
    """``?outbox=true`` turns nothing on by itself (no schema change on connect): on tables
    without the outbox such a store's appends and relay fail, naming the command to run;
    stores without the option append unrecorded."""
    plain = SqlEventStore(plain_url)
    needs = SqlEventStore(f"{plain_url}&outbox=true", auto_create_schema=False)
    bus = Bus(MemoryTransport(f"sqlrelay-{uuid.uuid4().hex}"))
    try:
        stored = await plain.append("s", [_event(1)])
        assert not plain.outbox_enabled
        assert not await plain.outbox_in_tables()
        assert needs.outbox_enabled  # it needs it: checked against the tables when used
        with pytest.raises(OutboxNotInTablesError, match="agentevents schema enable-outbox"):
            await needs.append("s", [_event(2)])
        assert await plain.read_stream("s") == stored, "the refused append stored nothing"
        with pytest.raises(OutboxNotEnabledError, match=r"outbox=true"):
            await plain.read_outbox(10)
        with pytest.raises(OutboxNotInTablesError):
            await needs.acquire_relay_lease("default", "me", 10)
        with pytest.raises(OutboxNotEnabledError, match=r"outbox=true"):
            OutboxRelay(plain, bus)  # not asked for, not known to be on
        with pytest.raises(OutboxNotInTablesError):
            await OutboxRelay(needs, bus).run()  # a configuration error: it ends
        assert await _outbox_rows(plain) == []
    finally:
        await bus.close()
        await plain.close()
        await needs.close()


@pytest.mark.asyncio
async def test_enabling_the_outbox_reaches_writers_that_read_it_off(plain_url: str) -> None:
    """A writer that found the outbox off records every append that starts after
    ``enable_outbox()`` returned: "off" is kept for at most OUTBOX_SETTING_TTL, and enabling
    waits that long. What was appended before is not in the outbox."""
    writer, admin = SqlEventStore(plain_url), SqlEventStore(plain_url)
    relay_store = SqlEventStore(f"{plain_url}&outbox=true", auto_create_schema=False)
    try:
        await writer.append("s", [_event(1)])  # reads "off" and keeps it
        started = time.monotonic()
        await admin.enable_outbox()
        assert time.monotonic() - started >= OUTBOX_SETTING_TTL
        after = await writer.append("s", [_event(2)])
        assert await relay_store.read_outbox(10) == after
        started = time.monotonic()
        await admin.enable_outbox()  # on already: idempotent, and no wait
        assert time.monotonic() - started < OUTBOX_SETTING_TTL
        assert await writer.outbox_in_tables()
    finally:
        for s in (writer, admin, relay_store):
            await s.close()


@pytest.mark.asyncio
async def test_sqlite_enables_the_outbox_when_it_creates_its_tables_with_it(
    tmp_path: Path,
) -> None:
    """SQLite stores create their schema on first use (``create_schema()``), which with
    ``?outbox=true`` includes enabling the outbox; another writer of the file follows."""
    base = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    relay_store, writer = SqlEventStore(f"{base}?outbox=true"), SqlEventStore(base)
    try:
        assert await relay_store.read_outbox(10) == []
        recorded = await writer.append("s", [_event(1)])
        assert await relay_store.read_outbox(10) == recorded
    finally:
        await relay_store.close()
        await writer.close()


# -- a stored row that cannot be read ---------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("column", "value"), [
    ("payload", "{not json"),
    ("event_id", "not-a-uuid"),
    ("event_type", "Not A Valid Type"),
    ("metadata", "[1, 2]"),
])  # fmt: skip
async def test_a_corrupt_row_stops_the_relay_there_naming_it(
    url: str, store: SqlEventStore, column: str, value: str
) -> None:
    """A row changed outside agentevents: the relay publishes the events before it, then
    ``run()`` ends with CorruptEventError naming the position and the fix; nothing is lost
    or skipped. Deleting its outbox row (the fix it names) lets the relay go on."""
    recorded = await store.append("s", [_event(n) for n in range(3)])
    bad = recorded[1].position
    events = store._tables.events
    async with store._engine.begin() as conn:
        await conn.execute(update(events).where(events.c.position == bad)
                           .values({column: value}))
    transport = RecordingTransport(f"sqlrelay-{uuid.uuid4().hex}")
    bus = Bus(transport)
    try:
        relay = OutboxRelay(store, bus, idle_timeout=0.05)
        with pytest.raises(CorruptEventError, match=f"position {bad}") as info:
            async with asyncio.timeout(10):
                await relay.run()
        assert info.value.position == bad
        assert f"DELETE FROM {store._tables.outbox.name} WHERE position = {bad}" \
            in str(info.value)
        assert transport.sent_ids() == [str(recorded[0].event.id)]
        assert await _outbox_rows(store) == [bad, recorded[2].position]
        if column in ("payload", "event_id"):  # what any read decodes (types are trusted)
            with pytest.raises(CorruptEventError, match=f"position {bad}"):
                await store.read_all()
        # The fix the message names: take it out of the outbox; the rest is published.
        async with store._engine.begin() as conn:
            outbox = store._tables.outbox
            await conn.execute(delete(outbox).where(outbox.c.position == bad))
        assert await relay.run_once() == 1
        assert transport.sent_ids() == [str(r.event.id) for r in (recorded[0], recorded[2])]
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_two_relays_drain_in_order_and_only_one_publishes(url: str) -> None:
    """Two relays (own store objects, pools) over one outbox: the lease lets one publish;
    every event once (nothing failed), in position order; the outbox ends empty."""
    writer = SqlEventStore(url)
    stores = [SqlEventStore(url), SqlEventStore(url)]
    transport = RecordingTransport(f"sqlrelay-{uuid.uuid4().hex}")
    bus = Bus(transport)
    relays = [OutboxRelay(s, bus, name="r", batch_size=17, idle_timeout=0.05) for s in stores]
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        recorded = []
        for n in range(120):
            stream = f"s{n % 7}"
            recorded += await writer.append(stream, [_event(n, key=stream)])
        await wait_for(lambda: sum(relay.published for relay in relays) >= len(recorded), 30,
                       what="every event published and marked")
        assert transport.sent_ids() == [str(r.event.id) for r in recorded]
        assert sorted(relay.published for relay in relays) == [0, len(recorded)]
        assert await writer.read_outbox(1000) == []
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.gather(*tasks)
        await bus.close()
        for s in [writer, *stores]:
            await s.close()


@pytest.mark.asyncio
async def test_one_outbox_is_relayed_under_one_name(url: str) -> None:
    """Relays of different names racing for a new outbox's first lease: one name wins, the
    others are refused (not a lease row each), then and later, expired or not."""
    stores = [SqlEventStore(url) for _ in range(6)]
    try:
        results = await asyncio.gather(*(
            store.acquire_relay_lease(f"name-{n}", f"owner-{n}", 0.5)
            for n, store in enumerate(stores)
        ), return_exceptions=True)
        won = [r for r in results if isinstance(r, Lease)]
        refused = [r for r in results if isinstance(r, RelayNameError)]
        assert len(won) == 1, results
        assert len(refused) == 5, results
        assert {r.existing for r in refused} == {won[0].name}
        assert f"{stores[0].table_prefix}relay_lease" in str(refused[0])
        lease = stores[0]._tables.relay_lease
        async with stores[0]._engine.connect() as conn:
            assert list(await conn.scalars(select(lease.c.name))) == [won[0].name]
        await asyncio.sleep(0.6)  # expired: still the one name
        with pytest.raises(RelayNameError):
            await stores[0].acquire_relay_lease("another", "owner-x", 10)
        again = await stores[0].acquire_relay_lease(won[0].name, "owner-x", 10)
        assert again is not None
        assert again.fence == won[0].fence + 1
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_bad_outbox_option_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigurationError, match="outbox") as info:
        SqlEventStore(f"sqlite+aiosqlite:///x.db?outbox={value}&password=s3cret")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(("query", "expected"), [("?outbox=true", True), ("?outbox=0", False),
                                                 ("", False), ("?outbox=yes", True)])
def test_outbox_option_from_the_url(query: str, expected: bool) -> None:
    assert SqlEventStore(f"sqlite+aiosqlite:///x.db{query}").outbox_enabled is expected
