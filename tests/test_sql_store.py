"""What the SQL store promises beyond the shared suite: table prefixes, schema creation,
secrets kept out of reprs and errors, writers in separate connections, its plugin entries.

Runs on SQLite only; the same store on PostgreSQL and MariaDB is checked by running the
shipped suite with ``--store-url`` against those servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import traceback
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from services import sql_server
from sqlalchemy import text

from agentevents import (
    ANY,
    NO_STREAM,
    BackendConnectionError,
    ConcurrencyError,
    ConfigurationError,
    DuplicateEventError,
    Event,
    EventValidationError,
    Snapshot,
    StoreError,
    create_store,
)
from agentevents.plugins import registry
from agentevents.stores import memory, sql
from agentevents.stores.sql import SqlEventStore, agentevents_store_backends

for name, plugin in (("memory_store", memory), ("sql", sql)):  # for a source checkout
    with contextlib.suppress(ValueError):  # already registered (entry point, other module)
        registry.register(plugin, name=name)


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("select name from sqlite_master where type='table'")}


def _event(name: str = "thing.happened", **fields: Any) -> Event:
    return Event(type=name, **fields)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"


@pytest.mark.asyncio
async def test_create_store_builds_a_sql_store_with_its_schema(tmp_path: Path) -> None:
    # A bare ``sqlite://`` URL gets the asyncio driver; SQLite creates its tables itself.
    store = create_store(f"sqlite:///{tmp_path / 'plain.db'}")
    try:
        assert isinstance(store, SqlEventStore)
        await store.append("s", [_event()])
        assert _tables(tmp_path / "plain.db") == {
            f"agentevents_{name}"
            for name in ("events", "snapshots", "outbox", "relay_lease", "settings",
                         "alembic_version")
        }
        with sqlite3.connect(tmp_path / "plain.db") as db:
            assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_table_prefixes_isolate_stores(tmp_path: Path, db_url: str) -> None:
    a = SqlEventStore(f"{db_url}?table_prefix=run_a_")
    b = SqlEventStore(db_url, table_prefix="run_b_")
    c = SqlEventStore(f"{db_url}?table_prefix=ignored_", table_prefix="run_a_")  # argument wins
    try:
        assert (a.table_prefix, b.table_prefix, c.table_prefix) == ("run_a_", "run_b_", "run_a_")
        await a.append("s", [_event(payload={"in": "a"})])
        await b.append("s", [_event(payload={"in": "b"}), _event(payload={"in": "b"})])
        assert _tables(tmp_path / "events.db") == {
            f"{prefix}{name}" for prefix in ("run_a_", "run_b_")
            for name in ("events", "snapshots", "outbox", "relay_lease", "settings",
                         "alembic_version")
        }
        assert [r.event.payload for r in await a.read_all()] == [{"in": "a"}]
        assert [r.event.payload for r in await c.read_all()] == [{"in": "a"}]
        assert await b.stream_version("s") == 2
    finally:
        for store in (a, b, c):
            await store.close()


@pytest.mark.parametrize("prefix", ["Bad", "1x", "a-b", "x" * 41, "a;drop"])
def test_invalid_table_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="table prefix"):
        SqlEventStore("sqlite+aiosqlite:///:memory:", table_prefix=prefix)


@pytest.mark.asyncio
async def test_create_schema_is_idempotent_and_servers_need_it(db_url: str) -> None:
    # auto_create_schema=False is how server stores behave: the tables must be created once.
    store = SqlEventStore(db_url, auto_create_schema=False)
    try:
        with pytest.raises(StoreError, match="create_schema") as info:
            await store.append("s", [_event()])
        assert not isinstance(info.value, BackendConnectionError)
        await store.create_schema()
        await store.create_schema()
        await store.append("s", [_event()], expected_version=NO_STREAM)
        await store.create_schema()  # existing tables and rows are left alone
        assert await store.stream_version("s") == 1
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_concurrent_schema_creation_from_several_stores(db_url: str) -> None:
    stores = [SqlEventStore(db_url) for _ in range(5)]
    try:
        await asyncio.gather(*(s.create_schema() for s in stores))
        results = await asyncio.gather(*(s.append(f"s{i}", [_event()]) for i, s in
                                         enumerate(stores)))
        assert sorted(r[0].position for r in results) == [1, 2, 3, 4, 5]
    finally:
        for store in stores:
            await store.close()


@pytest.mark.asyncio
async def test_secrets_stay_out_of_repr_and_errors(tmp_path: Path) -> None:
    # SQLite has no password, but a URI parameter can carry a secret just as well.
    missing = tmp_path / "missing-dir" / "events.db"
    store = SqlEventStore(f"sqlite+aiosqlite:///file:{missing}?uri=true&password=s3cret")
    try:
        assert "s3cret" not in repr(store)
        assert "password=***" in repr(store)
        with pytest.raises(BackendConnectionError) as info:
            await store.append("s", [_event()])
        assert "password=***" in str(info.value)
        assert "s3cret" not in "".join(traceback.format_exception(info.value))
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url", ["nosuchdb+nodriver://u:s3cret@host/db", "sqlite+aiosqlite://u:s3cret@host/x.db"]
)
def test_bad_url_is_a_configuration_error_without_the_secret(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        SqlEventStore(url)
    assert "u:***@" in str(info.value)
    assert "s3cret" not in "".join(traceback.format_exception(info.value))


@pytest.mark.asyncio
async def test_writers_in_separate_connections(db_url: str) -> None:
    """Stores in one process share nothing but the database: SQLite's lock arbitrates."""
    stores = [SqlEventStore(db_url) for _ in range(8)]
    try:
        await stores[0].append("s", [_event()])
        results = await asyncio.gather(
            *(s.append("s", [_event(), _event()], expected_version=1) for s in stores),
            return_exceptions=True,
        )
        outcomes = [type(r).__name__ for r in results]
        assert outcomes.count("list") == 1, outcomes
        assert outcomes.count("ConcurrencyError") == 7, outcomes
        assert await stores[1].stream_version("s") == 3

        same = _event("thing.duplicated")
        results = await asyncio.gather(
            *(s.append(f"d{i}", [same], expected_version=NO_STREAM) for i, s in enumerate(stores)),
            return_exceptions=True,
        )
        outcomes = [type(r).__name__ for r in results]
        assert outcomes.count("list") == 1, outcomes
        assert outcomes.count("DuplicateEventError") == 7, outcomes

        appended = await asyncio.gather(*(s.append("any", [_event()], ANY) for s in stores))
        assert sorted(r[0].version for r in appended) == list(range(1, 9))
    finally:
        for store in stores:
            await store.close()


@pytest.mark.asyncio
async def test_duplicate_is_told_apart_from_a_stale_version(db_url: str) -> None:
    store = SqlEventStore(db_url)
    try:
        stored = _event()
        await store.append("a", [stored])
        with pytest.raises(DuplicateEventError) as dup:
            await store.append("b", [_event(), stored], expected_version=NO_STREAM)
        assert dup.value.event_ids == [str(stored.id)]
        with pytest.raises(ConcurrencyError) as stale:
            await store.append("a", [_event()], expected_version=NO_STREAM)
        assert stale.value.actual == 1
        assert await store.stream_version("b") is None
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_values_that_are_not_json_are_refused(db_url: str) -> None:
    store = SqlEventStore(db_url)
    try:
        bad = Event.model_construct(**{**_event().__dict__, "payload": {"x": {1, 2}}})
        with pytest.raises(EventValidationError, match="payload"):  # built around validation
            await store.append("s", [_event(), bad])
        assert await store.stream_version("s") is None
        with pytest.raises(EventValidationError, match="naive"):
            await store.save_snapshot(Snapshot("s", 1, {}, time=datetime(2024, 1, 1)))
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_in_process_appends_wake_followers_at_once(db_url: str) -> None:
    store = SqlEventStore(db_url)
    try:
        head = await store.head_position()
        loop = asyncio.get_running_loop()
        waiter = asyncio.create_task(store.wait_for_append(head, 30))
        await asyncio.sleep(0.05)
        started = loop.time()
        await store.append("s", [_event()])
        await asyncio.wait_for(waiter, 5)
        assert loop.time() - started < 5
    finally:
        await store.close()


def test_plugin_entries_name_each_driver_and_extra() -> None:
    by_scheme = {s: info for info in agentevents_store_backends() for s in info.schemes}
    assert by_scheme["sqlite+aiosqlite"].requires == ("aiosqlite",)
    assert by_scheme["sqlite"].extra is None
    assert (by_scheme["postgresql+asyncpg"].requires, by_scheme["postgresql"].extra) == (
        ("asyncpg",), "postgres",
    )  # fmt: skip
    assert (by_scheme["mysql+asyncmy"].requires, by_scheme["mariadb"].extra) == (
        ("asyncmy",), "mysql",
    )  # fmt: skip
    assert all(info.kind == "store" for info in by_scheme.values())
    assert registry.lookup("sqlite+aiosqlite:///x.db", "store").name == "sql-sqlite"


def test_plugin_module_imports_no_sqlalchemy() -> None:
    code = (
        "import sys, agentevents.stores.sql; "
        "assert not [m for m in sys.modules if m.startswith('sqlalchemy')], 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.asyncio
async def test_postgresql_reads_translate_driver_errors_and_recover() -> None:
    # On PostgreSQL, reads go to asyncpg directly (past SQLAlchemy's error wrapping).
    import asyncpg

    base = sql_server("postgresql", "test reads through asyncpg")
    store = SqlEventStore(f"{base}?table_prefix=t_{uuid.uuid4().hex[:10]}_")
    try:
        with pytest.raises(StoreError, match="create_schema") as info:
            await store.read_all()
        assert not isinstance(info.value, BackendConnectionError)
        await store.create_schema()
        await store.append("s", [_event()])
        # The server ends the store's connection under it: one read fails as a lost
        # connection, and the next gets a fresh connection from the pool.
        async with store._engine.connect() as conn:  # the pool's one connection
            pid = await conn.scalar(text("SELECT pg_backend_pid()"))
        admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        with pytest.raises(BackendConnectionError, match=r"lost the connection.*127\.0\.0\.1") \
                as lost:
            await store.read_all()
        assert str(lost.value).count("lost the connection") == 1  # translated once
        assert "create_schema" not in str(lost.value)
        assert len(await store.read_all()) == 1
        await store.drop_schema()
    finally:
        await store.close()
