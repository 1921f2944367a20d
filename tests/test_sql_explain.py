"""Every read path of the SQL store is served by an index: EXPLAIN says which.

The acceptance check is PostgreSQL's plan; SQLite (the embedded default) and MariaDB are
checked the same way. Each database gets a table prefix of its own holding 20,000 events
whose every filter is selective (as an agent's timeline, a workflow's correlation id or an
hour of history is in a real store), then ANALYZE, then EXPLAIN of the very statements the
store runs. No planner setting is changed: a full table scan anywhere fails the test.

A server that cannot be reached skips loudly on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from services import sql_server
from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from agentevents import Event, EventQuery
from agentevents.stores.sql import SqlEventStore

EVENTS = 20_000
SOURCES = 200  # 100 events each: one agent's timeline
TYPES = 50  # 400 each
CORRELATIONS = 2_000  # 10 each: one workflow
STREAMS = 400  # 50 each, appended as one batch
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # event i happens at T0 + i minutes: 2 weeks


def _event(i: int) -> Event:
    return Event(
        type=f"agent.step{i % TYPES:02d}.done",
        source=f"agent-{(i * 7) % SOURCES:03d}",
        correlation_id=f"workflow-{(i * 13) % CORRELATIONS:04d}",
        time=T0 + timedelta(minutes=i),
        payload={"i": i},
    )


@dataclass(frozen=True)
class Filled:
    """A database whose table prefix holds the events, analysed."""

    kind: str
    base: str
    url: str


async def _fill(db: Filled) -> None:
    store = SqlEventStore(db.url)
    try:
        await store.create_schema()
        per_stream = EVENTS // STREAMS
        for s in range(STREAMS):
            await store.append(f"stream-{s:03d}", [_event(i) for i in
                                                   range(s * per_stream, (s + 1) * per_stream)])
        analyze = "ANALYZE TABLE" if db.kind == "mariadb" else "ANALYZE"
        engine = create_async_engine(db.base)
        try:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f"{analyze} {store.table_prefix}events")
        finally:
            await engine.dispose()
    finally:
        await store.close()


async def _drop(url: str) -> None:
    store = SqlEventStore(url)
    try:
        await store.drop_schema()
    finally:
        await store.close()


@pytest.fixture(scope="module", params=["postgresql", "sqlite", "mariadb"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Filled]:
    if request.param == "sqlite":
        folder: Path = tmp_path_factory.mktemp("explain")
        base = f"sqlite+aiosqlite:///{folder / 'events.db'}"
    else:
        base = sql_server(request.param, "check the query plans")
    db = Filled(request.param, base, f"{base}?table_prefix=t_{uuid.uuid4().hex[:10]}_")
    asyncio.run(_fill(db))
    yield db
    asyncio.run(_drop(db.url))


@dataclass(frozen=True)
class Plan:
    indexes: set[str]  # the indexes the plan reads (names as the database reports them)
    full_scans: list[str]  # table scans: must stay empty
    sorts: bool  # whether the rows are sorted after reading (not read in index order)
    text: str


async def _plan(db: Filled, conn: AsyncConnection, sql: str) -> Plan:
    if db.kind == "postgresql":
        document = (await conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}")).scalar_one()
        nodes = list(_nodes((json.loads(document) if isinstance(document, str)
                             else document)[0]["Plan"]))
        shown = [(n["Node Type"], n.get("Index Name") or n.get("Relation Name")) for n in nodes]
        return Plan({n["Index Name"] for n in nodes
                     if n["Node Type"] in SCANS and "Index Name" in n},
                    [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"],
                    any(n["Node Type"] in ("Sort", "Incremental Sort") for n in nodes),
                    str(shown))
    if db.kind == "sqlite":
        details = [row[-1] for row in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
        used = {m.group(1) for d in details
                if (m := re.search(r"USING (?:COVERING )?INDEX (\S+)", d))}
        used |= {"PRIMARY KEY" for d in details if "USING INTEGER PRIMARY KEY" in d}
        return Plan(used, [d for d in details if d.startswith("SCAN ") and "USING" not in d],
                    any("TEMP B-TREE" in d for d in details), str(details))
    rows = [row._mapping for row in await conn.exec_driver_sql(f"EXPLAIN {sql}")]
    return Plan({row["key"] for row in rows if row["key"]},
                [row["table"] for row in rows if row["type"] in ("ALL", "index")],
                any("filesort" in (row["Extra"] or "") for row in rows),
                str([dict(row) for row in rows]))


def _index_name(db: Filled, conn_indexes: dict[tuple[str, ...], str], prefix: str,
                short: str) -> str:
    """The name the database reports for schema.py's index ``short`` of the events table."""
    if short == "pkey":
        return {"postgresql": f"{prefix}events_pkey", "sqlite": "PRIMARY KEY",
                "mariadb": "PRIMARY"}[db.kind]
    if short == "stream_uq" and db.kind == "sqlite":  # SQLite names constraints' indexes
        return conn_indexes[("stream_id", "stream_version")]
    return f"{prefix}events_{short}"


async def _sqlite_indexes(conn: AsyncConnection, table: str) -> dict[tuple[str, ...], str]:
    found: dict[tuple[str, ...], str] = {}
    for row in await conn.exec_driver_sql(f"PRAGMA index_list('{table}')"):
        columns = [r[2] for r in await conn.exec_driver_sql(f"PRAGMA index_info('{row[1]}')")]
        found[tuple(columns)] = row[1]
    return found


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def _check(db: Filled, store: SqlEventStore, stmt: Select[Any], short: str) -> Plan:
    """EXPLAIN ``stmt`` (values inlined as the store binds them); assert it reads the index
    ``short`` and scans no table."""
    engine = create_async_engine(db.base)
    try:
        sql = str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        async with engine.connect() as conn:
            plan = await _plan(db, conn, sql)
            names = (await _sqlite_indexes(conn, f"{store.table_prefix}events")
                     if db.kind == "sqlite" else {})
    finally:
        await engine.dispose()
    assert not plan.full_scans, plan.text
    assert _index_name(db, names, store.table_prefix, short) in plan.indexes, plan.text
    return plan


async def _captured(store: SqlEventStore, call: Any) -> Select[Any]:
    """The SELECT the store runs through its one read path during ``await call()``.

    Captured at ``_records`` rather than from SQLAlchemy's events: on PostgreSQL the rows
    are fetched by asyncpg directly, past SQLAlchemy's execution events.
    """
    seen: list[Select[Any]] = []
    original = store._records

    async def recording(stmt: Select[Any]) -> Any:
        seen.append(stmt)
        return await original(stmt)

    store._records = recording  # type: ignore[method-assign]
    try:
        await call()
    finally:
        del store._records
    assert len(seen) == 1, seen
    return seen[0]


SCANS = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}

WINDOW = (T0 + timedelta(days=3), T0 + timedelta(days=3, hours=1))  # 60 of 20,000 events
QUERIES: dict[str, tuple[EventQuery, str]] = {
    "timeline by source over a time range": (
        EventQuery(source="agent-007", since=T0 + timedelta(days=2), until=T0 + timedelta(days=5)),
        "source_ix"),
    "timeline by source": (EventQuery(source="agent-007"), "source_ix"),
    "timeline by source, next page": (
        EventQuery(source="agent-007", after_position=EVENTS // 2, limit=20), "source_ix"),
    "by correlation id": (EventQuery(correlation_id="workflow-0042"), "correlation_ix"),
    "by type": (EventQuery(types=["agent.step07.done"]), "type_ix"),
    "by types": (EventQuery(types=["agent.step07.done", "agent.step08.done"]), "type_ix"),
    "by time range": (EventQuery(since=WINDOW[0], until=WINDOW[1]), "time_ix"),
    "by stream": (EventQuery(stream_id="stream-123"), "stream_uq"),
    "after a position": (EventQuery(after_position=EVENTS - 500), "pkey"),
}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(QUERIES))
async def test_query_uses_its_index(filled: Filled, name: str) -> None:
    query, index = QUERIES[name]
    store = SqlEventStore(filled.url)
    try:
        assert len(await store.query(query)) > 0  # the query finds something
        await _check(filled, store, store._query_statement(query), index)
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "index"), [
    ("read_stream", "stream_uq"),
    ("read_stream from a version", "stream_uq"),
    ("read_all", "pkey"),
    ("read_all after a position", "pkey"),
])  # fmt: skip
async def test_read_path_uses_its_index(filled: Filled, name: str, index: str) -> None:
    store = SqlEventStore(filled.url)
    calls = {
        "read_stream": lambda: store.read_stream("stream-123"),
        "read_stream from a version": lambda: store.read_stream("stream-123", 40),
        "read_all": lambda: store.read_all(limit=100),
        "read_all after a position": lambda: store.read_all(EVENTS // 2, limit=1000),
    }
    try:
        await _check(filled, store, await _captured(store, calls[name]), index)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_timeline_page_is_read_in_index_order(filled: Filled) -> None:
    # The next page of an agent's timeline is one range of (source, position), already in
    # position order: no sort of all the agent's events for each page (revision 0003).
    store = SqlEventStore(filled.url)
    try:
        query = EventQuery(source="agent-007", after_position=EVENTS // 2, limit=20)
        plan = await _check(filled, store, store._query_statement(query), "source_ix")
    finally:
        await store.close()
    assert not plan.sorts, plan.text
