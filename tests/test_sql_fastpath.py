"""The SQL store's appends and reads past SQLAlchemy's layers, on SQLite, MariaDB and
PostgreSQL: positions matched to events by stream version, never by the order the rows come
back in; batches split into several statements; driver errors translated; MariaDB's
commit-order lock released after every append; timestamps decoded exactly.

Each test uses its own table prefix and drops its tables. A server that cannot be reached
skips its tests loudly on a laptop and fails them under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from services import SQL_SERVERS, sql_base, sql_tables
from sqlalchemy import event, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from agentevents.core.errors import (
    BackendConnectionError,
    ConcurrencyError,
    CorruptEventError,
    DuplicateEventError,
    StoreError,
)
from agentevents.core.event import Event
from agentevents.core.store import NO_STREAM
from agentevents.stores._common import from_micros, to_micros
from agentevents.stores.sql import store as sql_store
from agentevents.stores.sql.store import SqlEventStore


def _base(kind: str, tmp_path: Path) -> str:
    return sql_base(kind, tmp_path, "run the append and read fast path tests")


@pytest_asyncio.fixture(params=["sqlite", *sorted(SQL_SERVERS)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh table prefix on each database; dropped afterwards."""
    url = f"{_base(request.param, tmp_path)}?table_prefix=f_{uuid.uuid4().hex[:10]}_"
    async with sql_tables(url):
        yield url


@pytest_asyncio.fixture
async def store(url: str) -> AsyncIterator[SqlEventStore]:
    store = SqlEventStore(url)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _driver_store(kind: str, tmp_path: Path, query: str = "") -> AsyncIterator[
        SqlEventStore]:
    """A store whose appends go through aiosqlite or asyncmy themselves."""
    url = f"{_base(kind, tmp_path)}?table_prefix=f_{uuid.uuid4().hex[:10]}_{query}"
    async with sql_tables(url):
        store = SqlEventStore(url)
        try:
            assert store._driver_sql is not None
            yield store
        finally:
            await store.close()


@pytest_asyncio.fixture(params=["sqlite", "mariadb"])
async def driver_store(request: pytest.FixtureRequest,
                       tmp_path: Path) -> AsyncIterator[SqlEventStore]:
    async with _driver_store(request.param, tmp_path) as store:
        yield store


@pytest_asyncio.fixture(params=["sqlite", "mariadb"])
async def outbox_store(request: pytest.FixtureRequest,
                       tmp_path: Path) -> AsyncIterator[SqlEventStore]:
    async with _driver_store(request.param, tmp_path, "&outbox=true") as store:
        yield store


def _event(n: int = 0, payload: dict[str, Any] | None = None) -> Event:
    return Event(type="fast.test", source="tester", payload=payload or {"n": n})


def _insert_statements(store: SqlEventStore, monkeypatch: pytest.MonkeyPatch, *,
                       reverse: bool = False) -> list[int]:
    """Count the parameters of each INSERT the store sends by its driver (a list that grows);
    with ``reverse``, hand the rows each returns back in the opposite order."""
    sent: list[int] = []
    original = store._driver_fetch

    async def fetch(conn: AsyncConnection, sql: str, params: Any) -> list[Any]:
        if sql.startswith("INSERT"):
            sent.append(len(params))
        rows = await original(conn, sql, params)
        if reverse and sql.startswith("INSERT"):
            rows.reverse()
        return rows

    monkeypatch.setattr(store, "_driver_fetch", fetch)
    return sent


async def _check_positions(store: SqlEventStore, size: int) -> None:
    """Append ``size`` events to a new stream: each one's position is the one read_all
    finds for its id, in batch order, after the stream's earlier events."""
    stream = f"s{size}-{uuid.uuid4().hex[:6]}"
    await store.append(stream, [_event(-1)])
    head = await store.head_position()
    recorded = await store.append(stream, [_event(n) for n in range(size)],
                                  expected_version=1)
    assert [r.version for r in recorded] == list(range(2, size + 2))
    positions = [r.position for r in recorded]
    assert positions == sorted(positions)
    assert len(set(positions)) == size
    assert positions[0] > head
    read = await store.read_all(head, limit=size + 10)
    assert {r.event.id: r.position for r in read} == {r.event.id: r.position for r in recorded}
    assert read == recorded  # the same events, versions, positions and recorded_at


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1, 2, 100, 2345])
async def test_each_event_gets_the_position_it_was_stored_at(
    store: SqlEventStore, size: int
) -> None:
    await _check_positions(store, size)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1, 2, 100, 1001])
async def test_positions_go_by_version_whatever_order_the_rows_come_back_in(
    driver_store: SqlEventStore, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    sent = _insert_statements(driver_store, monkeypatch, reverse=True)
    await _check_positions(driver_store, size)
    assert len(sent) == 1 + (2 if size > sql_store._INSERT_ROWS else 1)  # after 1 event


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1, 2, 100])
async def test_without_returning_positions_are_read_back(
    driver_store: SqlEventStore, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """MySQL, and SQLite before 3.35 and MariaDB before 10.5, have no INSERT ... RETURNING:
    the positions are read in a second statement, through SQLAlchemy."""
    await driver_store.head_position()  # connected: the dialect knows its server
    monkeypatch.setattr(driver_store._engine.dialect, "insert_returning", False)
    sent = _insert_statements(driver_store, monkeypatch)
    await _check_positions(driver_store, size)
    with pytest.raises(ConcurrencyError):
        await driver_store.append("x", [_event()], expected_version=3)
    assert sent == []


@pytest.mark.asyncio
async def test_big_batches_are_split_by_rows_bytes_and_bound_parameters(
    driver_store: SqlEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _insert_statements(driver_store, monkeypatch)
    columns = len(sql_store._ROW_COLUMNS)
    # Bytes: three payloads of 0.4 MB, then two of 0.3 M characters of 2 bytes in UTF-8.
    big = [_event(payload={"text": "x" * 400_000}) for _ in range(3)]
    wide = [_event(payload={"text": "\u00e9" * 300_000}) for _ in range(2)]
    recorded = await driver_store.append("big", big + wide)
    assert sent == [2 * columns, 1 * columns, 1 * columns, 1 * columns]
    read = await driver_store.read_stream("big")
    assert read == recorded
    assert read[-1].event.payload == {"text": "\u00e9" * 300_000}
    # Bound parameters: a dialect that binds at most 999 (SQLite before 3.32).
    sent.clear()
    monkeypatch.setattr(driver_store._engine.dialect, "insertmanyvalues_max_parameters", 999)
    await _check_positions(driver_store, 100)
    assert sent == [columns, (999 // columns) * columns, (100 - 999 // columns) * columns]


@pytest.mark.asyncio
@pytest.mark.parametrize("returning", [True, False])
async def test_the_outbox_gets_every_position_of_a_big_batch(
    outbox_store: SqlEventStore, monkeypatch: pytest.MonkeyPatch, returning: bool
) -> None:
    store = outbox_store
    if not returning:
        await store.head_position()  # connected: the dialect knows its server
        monkeypatch.setattr(store._engine.dialect, "insert_returning", False)
    recorded = await store.append("a", [_event(0)])
    recorded += await store.append("b", [_event(n) for n in range(sql_store._INSERT_ROWS + 7)])
    outbox = store._tables.outbox
    async with store._engine.connect() as conn:
        rows = list(await conn.scalars(select(outbox.c.position).order_by(outbox.c.position)))
    assert rows == [r.position for r in recorded]
    assert await store.read_outbox(5) == recorded[:5]


@pytest.mark.asyncio
async def test_a_collision_in_a_later_statement_rolls_back_the_whole_batch(
    driver_store: SqlEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = await driver_store.append("a", [_event()])
    head = await driver_store.head_position()
    sent = _insert_statements(driver_store, monkeypatch)
    batch = [_event(n) for n in range(sql_store._INSERT_ROWS + 5)]
    with pytest.raises(DuplicateEventError) as dup:  # the stored event is in the 2nd insert
        await driver_store.append("b", [*batch, stored[0].event])
    assert dup.value.event_ids == [str(stored[0].event.id)]
    assert len(sent) == 2
    with pytest.raises(ConcurrencyError):
        await driver_store.append("a", batch, expected_version=NO_STREAM)
    assert await driver_store.head_position() == head
    assert await driver_store.stream_version("b") is None


@pytest.mark.asyncio
async def test_a_lost_connection_in_an_append_is_translated_and_recovered(
    driver_store: SqlEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection dies between the commit-order lock and the driver's own statements:
    BackendConnectionError, nothing stored, and the next append works (on MariaDB the
    session and with it the lock ended)."""
    store = driver_store
    await store.append("s", [_event(1)])
    before_append = store._before_append

    async def lose_connection(conn: AsyncConnection) -> None:
        await before_append(conn)
        driver: Any = (await conn.get_raw_connection()).driver_connection
        if store._sqlite:
            await driver.close()
        else:
            session = await conn.scalar(text("SELECT CONNECTION_ID()"))
            admin = create_async_engine(store._engine.url)
            try:
                async with admin.connect() as other:
                    await other.execute(text(f"KILL {int(session)}"))
            finally:
                await admin.dispose()

    monkeypatch.setattr(store, "_before_append", lose_connection)
    with pytest.raises(BackendConnectionError, match="lost the connection"):
        await store.append("s", [_event(2)])
    monkeypatch.undo()
    async with asyncio.timeout(10):
        await store.append("s", [_event(3)], expected_version=1)
    assert [r.event.payload["n"] for r in await store.read_stream("s")] == [1, 3]


@pytest.mark.asyncio
async def test_a_missing_table_in_an_append_is_a_store_error(url: str) -> None:
    store = SqlEventStore(url, auto_create_schema=False)
    try:
        await store.append("s", [_event()])
        async with store._engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE {store._tables.events.name}"))
        with pytest.raises(StoreError, match="create_schema") as info:
            await store.append("s", [_event()])
        assert not isinstance(info.value, BackendConnectionError)
    finally:
        await store.close()


# -- MariaDB: the commit-order lock ---------------------------------------------------------


@pytest_asyncio.fixture
async def mariadb_store(tmp_path: Path) -> AsyncIterator[SqlEventStore]:
    url = f"{_base('mariadb', tmp_path)}?table_prefix=f_{uuid.uuid4().hex[:10]}_"
    async with sql_tables(url):
        store = SqlEventStore(url)
        try:
            yield store
        finally:
            await store.close()


async def _cancel_while_waiting(engine: AsyncEngine, work: Coroutine[Any, Any, Any],
                                statement: str, what: str) -> None:
    """Run ``work``; once MariaDB shows a statement like ``statement`` running (waiting for
    a lock another session holds), cancel it, and see the cancellation come back."""
    task = asyncio.ensure_future(work)
    waiting = text("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE :s")
    for _ in range(200):
        async with engine.connect() as probe:
            if await probe.scalar(waiting, {"s": statement}):
                break
        await asyncio.sleep(0.05)
    else:
        task.cancel()
        pytest.fail(f"{what} never waited for the other session")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _lock_is_free(store: SqlEventStore) -> bool:
    """Whether no session holds the store's commit-order lock (asked by another session)."""
    engine = create_async_engine(store._engine.url)
    try:
        async with engine.connect() as conn:
            free = await conn.scalar(text("SELECT IS_FREE_LOCK(:name)"),
                                     {"name": store._lock_name})
    finally:
        await engine.dispose()
    return bool(free == 1)


@pytest.mark.asyncio
async def test_the_commit_order_lock_is_released_after_every_append(
    mariadb_store: SqlEventStore
) -> None:
    store = mariadb_store
    await store.append("s", [_event(1), _event(2)])
    assert await _lock_is_free(store)
    with pytest.raises(ConcurrencyError):
        await store.append("s", [_event(3)], expected_version=NO_STREAM)
    assert await _lock_is_free(store)
    # The pooled connection holds no lock either: each append takes it once (GET_LOCK
    # counts, and a count left behind would block other processes' writers).
    async with store._engine.connect() as conn:
        assert await conn.scalar(text("SELECT IS_USED_LOCK(:name)"),
                                 {"name": store._lock_name}) is None


@pytest.mark.asyncio
async def test_a_failed_release_ends_the_session_and_so_the_lock(
    mariadb_store: SqlEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = mariadb_store
    sql = store._driver_sql
    assert sql is not None
    failing = dataclasses.replace(sql, release_lock="SELECT RELEASE_LOCK(%s) FROM no_table")
    monkeypatch.setattr(store, "_driver_sql", failing)
    recorded = await store.append("s", [_event(1)])  # committed: the release comes after
    monkeypatch.undo()
    for _ in range(200):  # the server ends the session: soon, not at once
        if await _lock_is_free(store):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the commit-order lock is still held after its connection was discarded")
    assert await store.read_all() == recorded
    await store.append("s", [_event(2)], expected_version=1)
    assert await _lock_is_free(store)


@pytest.mark.asyncio
async def test_an_append_cancelled_in_its_insert_ends_the_session_and_so_the_lock(
    mariadb_store: SqlEventStore
) -> None:
    """Cancelled while asyncmy waits for its INSERT: the connection, in the middle of a
    statement, is discarded; the session ends, rolled back, and the lock is free."""
    store = mariadb_store
    await store.append("s", [_event(1)])
    events = store._tables.events
    engine = create_async_engine(store._engine.url)
    try:
        async with engine.connect() as other:
            # An uncommitted row at the version the append inserts: its INSERT waits.
            await other.execute(events.insert().values(
                event_id=str(uuid.uuid4()), stream_id="s", stream_version=2,
                event_type="fast.test", event_version=1, event_time_us=0, source="other",
                payload="{}", metadata="{}", recorded_at_us=0))
            await _cancel_while_waiting(
                engine, store.append("s", [_event(2)], expected_version=1),
                f"INSERT INTO {events.name}%", "the append's INSERT")
            await other.rollback()
    finally:
        await engine.dispose()
    for _ in range(200):
        if await _lock_is_free(store):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the commit-order lock is still held after its append was cancelled")
    await store.append("s", [_event(3)], expected_version=1)
    assert [r.event.payload["n"] for r in await store.read_stream("s")] == [1, 3]


# -- reading --------------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MOMENTS = [
    datetime.min.replace(tzinfo=UTC),
    datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
    _EPOCH,
    datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(2024, 2, 29, 12, 30, 15, 123_456, tzinfo=UTC),
    datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
    datetime(2100, 3, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime.max.replace(tzinfo=UTC),
]


@pytest.mark.parametrize("moment", _MOMENTS)
def test_timestamps_decode_to_the_datetime_they_were_encoded_from(moment: datetime) -> None:
    micros = to_micros(moment)
    for value in (micros - 1, micros, micros + 1, micros - 1_000_000, micros + 1_000_000):
        try:
            expected = _EPOCH + timedelta(microseconds=value)  # the definition
        except OverflowError:
            with pytest.raises(OverflowError):
                from_micros(value)
            continue
        decoded = from_micros(value)
        assert decoded == expected
        assert decoded.tzinfo is UTC
        assert (decoded.year, decoded.month, decoded.day, decoded.hour, decoded.minute,
                decoded.second, decoded.microsecond) == (
            expected.year, expected.month, expected.day, expected.hour, expected.minute,
            expected.second, expected.microsecond)
    assert from_micros(micros) == moment


@pytest.mark.asyncio
@pytest.mark.parametrize(("column", "value"), [
    ("recorded_at_us", "not a number"),
    ("recorded_at_us", 10**18),
    ("event_time_us", -(10**18)),
])  # fmt: skip
async def test_a_bad_timestamp_in_a_row_names_that_row(
    tmp_path: Path, column: str, value: object
) -> None:
    """The rows of one append share their recorded_at: a changed row after the first one
    still fails, and names its position."""
    store = SqlEventStore(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    try:
        recorded = await store.append("s", [_event(n) for n in range(3)])
        bad = recorded[1].position
        events = store._tables.events
        async with store._engine.begin() as conn:
            await conn.execute(update(events).where(events.c.position == bad)
                               .values({column: value}))
        with pytest.raises(CorruptEventError, match=f"position {bad}"):
            await store.read_all()
        assert await store.read_all(limit=1) == recorded[:1]
        assert await store.read_all(bad) == recorded[2:]
    finally:
        await store.close()


async def _holds_the_write_lock(path: Path) -> bool:
    """Whether another connection to the SQLite file is refused the write lock now."""
    other = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.05})
    try:
        async with other.connect() as conn:
            try:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            except Exception as exc:
                return "locked" in str(exc)
            await conn.exec_driver_sql("ROLLBACK")
            return False
    finally:
        await other.dispose()


@pytest.mark.asyncio
async def test_every_sqlite_write_transaction_holds_the_write_lock(tmp_path: Path) -> None:
    """A store's write transaction sends its first BEGIN IMMEDIATE through aiosqlite; a
    write connection that begins without that (any other path) gets it from the begin hook,
    never autocommit; reads begin with a plain BEGIN."""
    path = tmp_path / "events.db"
    async with _driver_store("sqlite", tmp_path) as store:
        await store.append("a", [_event()])
        assert not await _holds_the_write_lock(path)
        async with store._open(write=True) as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            assert raw.in_transaction
            assert await _holds_the_write_lock(path)
        async with store._engine.connect() as conn:
            await conn.execution_options(**{sql_store._WRITE: True})
            async with conn.begin():
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw.in_transaction, "a write transaction ran in autocommit"
                assert await _holds_the_write_lock(path)
        async with store._open(write=False) as conn:
            await conn.execute(text("SELECT 1"))
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw.in_transaction
            assert not await _holds_the_write_lock(path)
        assert [r.version for r in await store.read_stream("a")] == [1]


@pytest.mark.asyncio
async def test_a_version_too_big_for_the_column_is_refused_before_anything_is_sent(
    url: str,
) -> None:
    from agentevents.core.errors import EventValidationError

    store = SqlEventStore(url)
    try:
        with pytest.raises(EventValidationError, match="INTEGER"):
            await store.append("v", [_event(), Event(type="fast.test", version=2**31)])
        await store.append("v", [Event(type="fast.test", version=2**31 - 1)])
        [stored] = await store.read_stream("v")
        assert stored.event.version == 2**31 - 1
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sqlite", "mariadb"])
async def test_the_pool_rolls_back_only_a_connection_returned_in_a_transaction(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a store transaction (which ends with its own COMMIT or ROLLBACK) the pool sends
    no second rollback; a connection returned with a transaction still open is rolled back,
    its uncommitted write gone and its locks released."""
    async with _driver_store(kind, tmp_path) as store:
        await store.append("a", [_event()])  # connected
        async with store._engine.connect() as conn:
            adapted: Any = (await conn.get_raw_connection()).dbapi_connection
        rollbacks: list[object] = []
        original = type(adapted).rollback

        def counting(self: Any) -> None:
            rollbacks.append(self)
            original(self)

        monkeypatch.setattr(type(adapted), "rollback", counting)
        await store.append("a", [_event(1)])
        await store.read_all()
        assert rollbacks == []
        # An uncommitted write through the driver, then back to the pool.
        events = store._tables.events.name
        async with store._engine.connect() as conn:
            driver: Any = (await conn.get_raw_connection()).driver_connection
            if kind == "sqlite":
                await driver.execute("BEGIN IMMEDIATE")
                await driver.execute(f"DELETE FROM {events}")
            else:
                async with driver.cursor() as cursor:
                    await cursor.execute(f"DELETE FROM {events}")
        assert len(rollbacks) == 1
        assert [r.version for r in await store.read_stream("a")] == [1, 2]
        await store.append("a", [_event(2)])  # no lock left behind
        assert [r.version for r in await store.read_stream("a")] == [1, 2, 3]


@pytest.mark.asyncio
async def test_a_transaction_whose_first_statement_failed_is_rolled_back_on_return(
    mariadb_store: SqlEventStore,
) -> None:
    """asyncmy's transaction flag comes from successful replies only: after a COMMIT, a
    failed UPDATE leaves it saying "no transaction" while the server holds the UPDATE's row
    locks. The pool must roll that connection back anyway."""
    store = mariadb_store
    await store.append("a", [_event(0), _event(1)])
    events = store._tables.events.name
    async with store._engine.connect() as conn:
        driver: Any = (await conn.get_raw_connection()).driver_connection
        await driver.commit()
        async with driver.cursor() as cursor:
            with pytest.raises(Exception, match="Duplicate"):  # locks both rows, then fails
                await cursor.execute(
                    f"UPDATE {events} SET stream_version = 1 WHERE stream_id = 'a'")
        assert not driver.server_status & 0x0001, "asyncmy's flag is no longer stale"
    engine = create_async_engine(store._engine.url)
    try:
        async with engine.begin() as other:
            await other.execute(text("SET SESSION innodb_lock_wait_timeout = 2"))
            await other.execute(text(f"UPDATE {events} SET source = 'x' WHERE stream_id = 'a'"))
            await other.rollback()
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_a_schema_change_cancelled_while_it_waits_for_the_schema_lock_keeps_no_lock(
    mariadb_store: SqlEventStore,
) -> None:
    """Cancelled in GET_LOCK of the schema lock: the server may still grant the lock to the
    session after the holder lets go; that session is ended, never pooled with the lock."""
    store = mariadb_store
    name = f"agentevents-schema:{store.table_prefix}"[:64]
    engine = create_async_engine(store._engine.url)
    free = text("SELECT IS_FREE_LOCK(:name)")
    try:
        async with engine.connect() as holder:
            assert await holder.scalar(text("SELECT GET_LOCK(:name, 5)"), {"name": name}) == 1
            await _cancel_while_waiting(engine, store.create_schema(),
                                        f"SELECT GET_LOCK('{name}'%", "create_schema")
            await holder.scalar(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        for _ in range(100):
            async with engine.connect() as probe:
                if await probe.scalar(free, {"name": name}) == 1:
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the schema lock is held by a session the cancelled change left")
    finally:
        await engine.dispose()
    await store.create_schema()  # and schema changes go on


@pytest.mark.asyncio
async def test_a_mariadb_schema_change_releases_its_lock_and_keeps_its_connection(
    mariadb_store: SqlEventStore,
) -> None:
    """The schema lock is released by RELEASE_LOCK after the commit, not by ending the
    session: no connection is discarded, and the lock is free afterwards."""
    store = mariadb_store
    invalidated: list[object] = []
    event.listen(store._engine.sync_engine, "invalidate",
                 lambda *args: invalidated.append(args[-1]))
    await store.create_schema()  # the tables exist: it still takes the lock, finds the head
    await store.create_schema()
    assert invalidated == []
    name = f"agentevents-schema:{store.table_prefix}"[:64]
    async with store._engine.connect() as conn:
        assert await conn.scalar(text("SELECT IS_FREE_LOCK(:name)"), {"name": name}) == 1
