"""Benchmarks of the embedded defaults: the memory bus and the SQLite store.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_embedded.py            # defaults: 100k bus, 20k store
    .venv/bin/python benchmarks/bench_embedded.py --events 200000 --repeat 5

Each figure is the median of ``--repeat`` runs, next to a raw baseline measured in the same
run: for the bus, the same events handed from a producer to a consumer task through a bare
``asyncio.Queue`` (the floor of any in-process handoff); for the store, plain SQLAlchemy Core
``executemany`` inserts and selects on an equivalent table. Results go to docs/benchmarks.md.

It also measures the ceiling the core puts on every real-broker backend: encoded bodies
delivered through a transport that costs nothing (receive hands out ready messages, ack
does nothing), so the figure is decoding plus the core's delivery loop, next to
``decode_event`` alone over the same bodies. A broker backend's consume rate can approach,
never pass, this figure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from agentevents import Event, create_bus, create_store
from agentevents.core.bus import Bus
from agentevents.core.codec import decode_event, encode_event
from agentevents.core.deadletter import DeadLetter
from agentevents.core.store import EventStore
from agentevents.core.transport import (
    Capabilities,
    ConsumerSpec,
    InboundMessage,
    OutboundMessage,
    Receiver,
    Transport,
)

Runner = Callable[[], Awaitable[float]]


def make_events(n: int, type_: str = "bench.event", keyed: bool = False) -> list[Event]:
    return [
        Event(type=type_, source="bench", payload={"i": i, "text": "x" * 64},
              key=f"k{i % 64}" if keyed else None)
        for i in range(n)
    ]


async def bus_publish_to_handler(n: int, batch: int, keyed: bool, round_: int) -> float:
    """events/s from the first publish to the last handler call, one group, one member."""
    events = make_events(n, keyed=keyed)
    bus = create_bus(f"memory://bench-{round_}-{batch}-{keyed}")
    done = asyncio.Event()
    seen = 0

    async def handler(event: Event) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    await bus.subscribe("bench.>", handler, group="bench", max_in_flight=256)
    start = time.perf_counter()
    if batch == 1:
        for event in events:
            await bus.publish(event)
    else:
        for i in range(0, n, batch):
            await bus.publish_many(events[i : i + batch])
    await done.wait()
    elapsed = time.perf_counter() - start
    await bus.close()
    return n / elapsed


async def raw_queue(n: int) -> float:
    """Baseline: the same Event objects through a bare asyncio.Queue to a consumer task."""
    events = make_events(n)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    done = asyncio.Event()

    async def consumer() -> None:
        for _ in range(n):
            await queue.get()
        done.set()

    task = asyncio.create_task(consumer())
    start = time.perf_counter()
    for event in events:
        queue.put_nowait(event)
        if queue.qsize() >= 1000:
            await asyncio.sleep(0)
    await done.wait()
    elapsed = time.perf_counter() - start
    await task
    return n / elapsed


class ReadyReceiver(Receiver):
    """Hands out pre-encoded bodies, up to 100 per receive, as a broker client would."""

    def __init__(self, bodies: list[bytes]) -> None:
        self._bodies = bodies
        self._next = 0

    async def receive(self, max_messages: int, timeout: float) -> list[InboundMessage]:
        start = self._next
        if start >= len(self._bodies):
            await asyncio.sleep(timeout)
            return []
        chunk = self._bodies[start : start + min(max_messages, 100)]
        self._next += len(chunk)
        return [InboundMessage(body, "bench.event", 1, None, start + i)
                for i, body in enumerate(chunk)]

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        pass

    async def nack(self, messages: Sequence[InboundMessage], delay: float = 0.0) -> None:
        pass

    async def extend(self, messages: Sequence[InboundMessage]) -> None:
        pass

    async def close(self) -> None:
        pass


class ReadyTransport(Transport):
    """A broker transport that costs nothing: the core's own ceiling."""

    def __init__(self, bodies: list[bytes]) -> None:
        self._bodies = bodies

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def send(self, messages: Sequence[OutboundMessage]) -> None:
        pass

    async def open_receiver(self, spec: ConsumerSpec) -> Receiver:
        return ReadyReceiver(self._bodies)

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        pass

    async def read_dead_letters(self, group: str | None = None,
                                limit: int = 100) -> list[DeadLetter]:
        return []

    async def close(self) -> None:
        pass


async def core_ceiling(n: int, keyed: bool) -> float:
    """events/s of decode + delivery loop + ack batching, from encoded bodies."""
    bodies = [encode_event(e) for e in make_events(n, keyed=keyed)]
    bus = Bus(ReadyTransport(bodies), url="ready://")
    done = asyncio.Event()
    seen = 0

    async def handler(event: Event) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    start = time.perf_counter()
    await bus.subscribe("bench.>", handler, group="bench", max_in_flight=256)
    await done.wait()
    elapsed = time.perf_counter() - start
    await bus.close()
    return n / elapsed


async def decode_only(n: int) -> float:
    bodies = [encode_event(e) for e in make_events(n, keyed=True)]
    start = time.perf_counter()
    for body in bodies:
        decode_event(body)
    return n / (time.perf_counter() - start)


async def store_append(store: EventStore, n: int, per_tx: int) -> float:
    events = make_events(n)
    start = time.perf_counter()
    for s, i in enumerate(range(0, n, per_tx)):
        await store.append(f"bench-{per_tx}-{s % 100}-{time.monotonic_ns()}", events[i:i + per_tx])
    return n / (time.perf_counter() - start)


async def store_read_all(store: EventStore, page: int = 1000) -> float:
    start = time.perf_counter()
    position, count = 0, 0
    while True:
        batch = await store.read_all(position, page)
        if not batch:
            break
        count += len(batch)
        position = batch[-1].position
    return count / (time.perf_counter() - start)


async def raw_core(path: Path, n: int, per_tx: int) -> tuple[float, float]:
    """Baseline: SQLAlchemy Core executemany + select on a table shaped like the store's."""
    import orjson
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    meta = sa.MetaData()
    table = sa.Table(
        "raw_events", meta,
        sa.Column("position", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                  primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), unique=True, nullable=False),
        sa.Column("stream_id", sa.String(255), nullable=False),
        sa.Column("stream_version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(255), nullable=False),
        sa.Column("time_us", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.UniqueConstraint("stream_id", "stream_version"),
    )
    async with engine.begin() as conn:
        await conn.run_sync(meta.create_all)
    events = make_events(n)
    start = time.perf_counter()
    for s, i in enumerate(range(0, n, per_tx)):
        rows = [
            {"event_id": str(e.id), "stream_id": f"s{s}", "stream_version": v + 1, "type": e.type,
             "time_us": int(e.time.timestamp() * 1e6), "source": e.source,
             "payload": orjson.dumps(e.payload).decode()}
            for v, e in enumerate(events[i : i + per_tx])
        ]
        async with engine.begin() as conn:
            await conn.execute(table.insert(), rows)
    append_rate = n / (time.perf_counter() - start)
    start = time.perf_counter()
    count, position = 0, 0
    async with engine.connect() as conn:
        while True:
            result = await conn.execute(
                sa.select(table).where(table.c.position > position)
                .order_by(table.c.position).limit(1000)
            )
            rows = result.all()
            if not rows:
                break
            for row in rows:  # decode as the store must: JSON payload back to a dict
                orjson.loads(row.payload)
            count += len(rows)
            position = rows[-1].position
    read_rate = count / (time.perf_counter() - start)
    await engine.dispose()
    return append_rate, read_rate


def median(values: list[float]) -> float:
    return statistics.median(values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per bus run")
    parser.add_argument("--store-events", type=int, default=20_000, help="events per store run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, sn, r = args.events, args.store_events, args.repeat

    rows: list[tuple[str, float, str]] = []
    raw = median([await raw_queue(n) for _ in range(r)])
    rows.append(("raw asyncio.Queue handoff (baseline)", raw, "1.00x"))
    for label, batch, keyed in [
        ("memory bus publish_many(1000) -> handler", 1000, False),
        ("memory bus publish_many(1000) -> handler, 64 keys", 1000, True),
        ("memory bus awaited publish -> handler", 1, False),
    ]:
        rate = median([await bus_publish_to_handler(n, batch, keyed, i) for i in range(r)])
        rows.append((label, rate, f"{rate / raw:.2f}x"))

    decode = median([await decode_only(n) for _ in range(r)])
    rows.append(("decode_event alone, same bodies (baseline)", decode, "1.00x"))
    for label, keyed in [("zero-cost broker transport -> handler (decode + core)", False),
                         ("same, events spread over 64 keys", True)]:
        rate = median([await core_ceiling(n, keyed) for _ in range(r)])
        rows.append((label, rate, f"{rate / decode:.2f}x"))

    with tempfile.TemporaryDirectory() as tmp:
        raw_append, raw_read = [], []
        for i in range(r):
            a, b = await raw_core(Path(tmp) / f"raw{i}.db", sn, 100)
            raw_append.append(a)
            raw_read.append(b)
        ra, rr = median(raw_append), median(raw_read)
        appends100, appends1, reads = [], [], []
        for i in range(r):
            store = create_store(f"sqlite+aiosqlite:///{tmp}/store{i}.db")
            appends100.append(await store_append(store, sn, 100))
            appends1.append(await store_append(store, sn // 10, 1))
            reads.append(await store_read_all(store))
            await store.close()
        rows.append(("raw Core executemany, 100/tx (baseline)", ra, "1.00x"))
        rows.append(("SQLite store append, 100/tx", median(appends100),
                     f"{median(appends100) / ra:.2f}x"))
        rows.append(("SQLite store append, 1/tx", median(appends1), "-"))
        rows.append(("raw Core select pages of 1000 (baseline)", rr, "1.00x"))
        rows.append(("SQLite store read_all pages of 1000", median(reads),
                     f"{median(reads) / rr:.2f}x"))

    width = max(len(label) for label, _, _ in rows)
    print(f"{'benchmark':<{width}}  {'events/s':>12}  vs raw")
    for label, rate, ratio in rows:
        print(f"{label:<{width}}  {rate:>12,.0f}  {ratio}")


if __name__ == "__main__":
    asyncio.run(main())
