"""The SQL store's outbox on SQLite, PostgreSQL and MariaDB: outbox rows are written in the
append's transaction (a failed append writes none, and an append whose outbox row cannot be
written stores no event), the ``outbox`` option, and relays draining it through the lease.

Each test uses its own table prefix and drops its tables. A server that cannot be reached
skips its tests loudly on a laptop and fails them under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from services import SQL_SERVERS, sql_server, sql_tables
from sqlalchemy import select, text
from test_relay import RecordingTransport

from agentevents.backends.memory import MemoryTransport
from agentevents.conformance_tests.helpers import wait_for
from agentevents.core.bus import Bus
from agentevents.core.errors import (
    ConcurrencyError,
    ConfigurationError,
    DuplicateEventError,
    OutboxNotEnabledError,
    RelayNameError,
    StoreError,
)
from agentevents.core.event import Event
from agentevents.core.outbox import Lease, Outbox
from agentevents.core.store import NO_STREAM
from agentevents.relay import OutboxRelay
from agentevents.stores.sql.store import SqlEventStore


@pytest_asyncio.fixture(params=["sqlite", *sorted(SQL_SERVERS)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh table prefix on each database, with the outbox on; dropped afterwards."""
    prefix = f"t_{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        base = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    else:
        base = sql_server(request.param, "run the outbox tests")
    url = f"{base}?table_prefix={prefix}&outbox=true"
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


@pytest.mark.asyncio
async def test_store_without_the_outbox_writes_no_rows(url: str, store: SqlEventStore) -> None:
    plain = SqlEventStore(url, outbox=False)  # the argument wins over ?outbox=true
    try:
        assert not plain.outbox_enabled
        await plain.append("s", [_event(1)])
        assert await _outbox_rows(store) == []
        with pytest.raises(OutboxNotEnabledError, match=r"\?outbox=true"):
            await plain.read_outbox(10)
        with pytest.raises(OutboxNotEnabledError):
            OutboxRelay(plain, Bus(MemoryTransport(f"sqlrelay-{uuid.uuid4().hex}")))
    finally:
        await plain.close()


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
