"""Benchmark of the SQL event store against raw SQLAlchemy Core (and raw asyncpg on
PostgreSQL) on the same database and the same table, in one run.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_sql.py                      # PostgreSQL on 127.0.0.1
    .venv/bin/python benchmarks/bench_sql.py --url mysql+asyncmy://root@127.0.0.1:3306/test
    .venv/bin/python benchmarks/bench_sql.py --url sqlite+aiosqlite:///tmp/bench.db

Figures (events/s, median of ``--repeat`` runs; the rows of a section run round-robin, so that
a machine whose speed drifts slows them alike):

* append, 1 event per transaction and 100 per transaction (outbox off, then on);
* raw Core ``executemany`` of the same rows into the store's own table (same indexes,
  same constraints), 100 per transaction, without and with the commit-order lock the store
  takes on servers (``pg_advisory_xact_lock`` / ``GET_LOCK``): the lock's own cost;
* raw asyncpg ``executemany`` and ``copy_records_to_table`` (PostgreSQL only);
* read_all in pages of 1,000 vs a raw Core select of the same pages that parses the JSON
  payload (and raw asyncpg ``fetch``, PostgreSQL only);
* catch-up: ``store.subscribe()`` from position 0 over the whole log.

Every run uses its own table prefix and drops its tables at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from agentevents import Event
from agentevents.stores._common import to_micros
from agentevents.stores.sql.schema import tables
from agentevents.stores.sql.store import SqlEventStore


def make_events(n: int) -> list[Event]:
    return [Event(type="bench.event", source="bench", key=f"k{i % 64}",
                  payload={"i": i, "text": "x" * 64}) for i in range(n)]


def store_url(base: str, prefix: str, **options: str) -> str:
    query = "&".join([f"table_prefix={prefix}", *(f"{k}={v}" for k, v in options.items())])
    return f"{base}{'&' if '?' in base else '?'}{query}"


async def fresh_store(base: str, **options: str) -> SqlEventStore:
    store = SqlEventStore(store_url(base, f"b{uuid.uuid4().hex[:8]}_", **options))
    await store.create_schema()
    return store


async def drop(store: SqlEventStore) -> None:
    await store.drop_schema()
    await store.close()


# -- agentevents ---------------------------------------------------------------------------


async def ae_append(base: str, n: int, per_tx: int, outbox: bool) -> float:
    store = await fresh_store(base, **({"outbox": "true"} if outbox else {}))
    events = make_events(n)
    await store.append("warm-up", [Event(type="bench.warm")])
    start = time.perf_counter()
    for s, i in enumerate(range(0, n, per_tx)):
        await store.append(f"stream-{s}", events[i : i + per_tx])
    rate = n / (time.perf_counter() - start)
    await drop(store)
    return rate


async def filled_store(base: str, n: int) -> SqlEventStore:
    store = await fresh_store(base)
    events = make_events(n)
    for s, i in enumerate(range(0, n, 500)):
        await store.append(f"stream-{s}", events[i : i + 500])
    return store


async def ae_read_all(store: SqlEventStore) -> float:
    start = time.perf_counter()
    position, count = 0, 0
    while batch := await store.read_all(position, 1000):
        count += len(batch)
        position = batch[-1].position
    return count / (time.perf_counter() - start)


async def ae_catch_up(store: SqlEventStore, n: int) -> float:
    start = time.perf_counter()
    count = 0
    async for _recorded in store.subscribe(0, batch_size=1000):
        count += 1
        if count == n:
            break
    return count / (time.perf_counter() - start)


# -- raw -----------------------------------------------------------------------------------


def engine_of(store: SqlEventStore) -> AsyncEngine:
    url = store._engine.url  # the same database and driver the store uses
    return create_async_engine(url)


def rows_of(events: list[Event], stream: str) -> list[dict[str, Any]]:
    now = to_micros(events[0].time)
    return [
        {"event_id": str(e.id), "stream_id": stream, "stream_version": v, "event_type": e.type,
         "event_version": e.version, "event_time_us": to_micros(e.time), "source": e.source,
         "correlation_id": e.correlation_id, "causation_id": e.causation_id,
         "partition_key": e.key, "payload": orjson.dumps(e.payload).decode(),
         "metadata": orjson.dumps(e.metadata).decode(), "recorded_at_us": now}
        for v, e in enumerate(events, start=1)
    ]


async def raw_core_append(base: str, n: int, per_tx: int, lock: bool) -> float:
    """Core executemany into the store's own table; ``lock`` adds the commit-order lock."""
    store = await fresh_store(base)
    table = tables(store.table_prefix).events
    engine = engine_of(store)
    backend = engine.dialect.name
    events = make_events(n)
    start = time.perf_counter()
    for s, i in enumerate(range(0, n, per_tx)):
        rows = rows_of(events[i : i + per_tx], f"stream-{s}")
        async with engine.begin() as conn:
            if lock and backend == "postgresql":
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(42)"))
            elif lock and backend in ("mysql", "mariadb"):
                await conn.execute(sa.text("SELECT GET_LOCK('bench', 30)"))
            await conn.execute(table.insert(), rows)
        if lock and backend in ("mysql", "mariadb"):
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT RELEASE_LOCK('bench')"))
    rate = n / (time.perf_counter() - start)
    await engine.dispose()
    await drop(store)
    return rate


def asyncpg_dsn(store: SqlEventStore) -> str:
    url = store._engine.url.set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def raw_asyncpg_append(base: str, n: int, per_tx: int, copy: bool) -> float:
    import asyncpg

    store = await fresh_store(base)
    table = tables(store.table_prefix).events
    columns = [c.name for c in table.columns if c.name != "position"]
    conn = await asyncpg.connect(asyncpg_dsn(store))
    insert = (f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "
              f"({', '.join(f'${i}' for i in range(1, len(columns) + 1))})")
    events = make_events(n)
    start = time.perf_counter()
    for s, i in enumerate(range(0, n, per_tx)):
        records = [tuple(row[c] for c in columns)
                   for row in rows_of(events[i : i + per_tx], f"stream-{s}")]
        async with conn.transaction():
            if copy:
                await conn.copy_records_to_table(table.name, records=records, columns=columns)
            else:
                await conn.executemany(insert, records)
    rate = n / (time.perf_counter() - start)
    await conn.close()
    await drop(store)
    return rate


async def raw_core_read(store: SqlEventStore) -> float:
    table = tables(store.table_prefix).events
    engine = engine_of(store)
    start = time.perf_counter()
    position, count = 0, 0
    async with engine.connect() as conn:
        while True:
            rows = (await conn.execute(
                sa.select(table).where(table.c.position > position)
                .order_by(table.c.position).limit(1000)
            )).all()
            if not rows:
                break
            for row in rows:  # what any reader must do at least: parse the payload
                orjson.loads(row.payload)
            count += len(rows)
            position = rows[-1].position
    rate = count / (time.perf_counter() - start)
    await engine.dispose()
    return rate


async def raw_asyncpg_read(store: SqlEventStore) -> float:
    import asyncpg

    table = tables(store.table_prefix).events.name
    conn = await asyncpg.connect(asyncpg_dsn(store))
    query = f"SELECT * FROM {table} WHERE position > $1 ORDER BY position LIMIT 1000"
    start = time.perf_counter()
    position, count = 0, 0
    while rows := await conn.fetch(query, position):
        for row in rows:
            orjson.loads(row["payload"])
        count += len(rows)
        position = rows[-1]["position"]
    rate = count / (time.perf_counter() - start)
    await conn.close()
    return rate


# -- the run -------------------------------------------------------------------------------


Runner = Callable[[], Awaitable[float]]


async def interleaved(runners: dict[str, Runner], repeat: int) -> dict[str, float]:
    """The median rate of each runner over ``repeat`` rounds, the rows of a round run one
    after another (round-robin): a machine whose speed drifts slows them alike, so the
    ratios within a section hold better than the figures do."""
    results: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeat):
        for label, runner in runners.items():
            results[label].append(await runner())
    return {label: statistics.median(rates) for label, rates in results.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--single", type=int, default=2_000,
                        help="events for the 1-per-transaction figures")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    url, n, r = args.url, args.events, args.repeat
    postgres = url.startswith(("postgresql", "postgres"))

    def report(rates: dict[str, float], base: str) -> None:
        for label, rate in rates.items():
            ratio = f"{rate / rates[base]:.2f}x" if label != base else ""
            print(f"  {label:<52} {rate:>10,.0f} ev/s {ratio}", flush=True)

    print(f"SQL store vs raw, {n} events, median of {r} (rows of a section interleaved), "
          f"{url.split('@')[-1]}")
    batch: dict[str, Runner] = {
        "raw Core executemany, 100/tx": lambda: raw_core_append(url, n, 100, lock=False),
        "raw Core executemany, 100/tx + commit-order lock":
            lambda: raw_core_append(url, n, 100, lock=True),
    }
    if postgres:
        batch["raw asyncpg executemany, 100/tx"] = \
            lambda: raw_asyncpg_append(url, n, 100, copy=False)
        batch["raw asyncpg COPY, 100/tx"] = lambda: raw_asyncpg_append(url, n, 100, copy=True)
    batch["append, 100/tx"] = lambda: ae_append(url, n, 100, False)
    batch["append, 100/tx, outbox on"] = lambda: ae_append(url, n, 100, True)
    report(await interleaved(batch, r), "raw Core executemany, 100/tx")
    report(await interleaved({
        "raw Core insert, 1/tx": lambda: raw_core_append(url, args.single, 1, lock=False),
        "append, 1/tx": lambda: ae_append(url, args.single, 1, False),
    }, r), "raw Core insert, 1/tx")

    store = await filled_store(url, n)
    try:
        reads: dict[str, Runner] = {
            "raw Core select, pages of 1000 + payload JSON": lambda: raw_core_read(store),
        }
        if postgres:
            reads["raw asyncpg fetch, pages of 1000 + payload JSON"] = \
                lambda: raw_asyncpg_read(store)
        reads["read_all, pages of 1000"] = lambda: ae_read_all(store)
        reads["catch-up subscribe from 0"] = lambda: ae_catch_up(store, n)
        report(await interleaved(reads, r), "raw Core select, pages of 1000 + payload JSON")
    finally:
        await drop(store)


if __name__ == "__main__":
    asyncio.run(main())
