"""Benchmark of the Redis Streams bus against raw redis-py on the same server, in one run.

Run by hand (never in CI), with Redis on 127.0.0.1:6379::

    .venv/bin/python benchmarks/bench_redis.py                  # 20k events
    .venv/bin/python benchmarks/bench_redis.py --events 50000 --url redis://host:6379/0

Figures (events/s, median of ``--repeat`` runs, the bus's and the baseline's taken in
turns), each next to its raw redis-py baseline:

* publish: ``await bus.publish(e)`` one at a time vs an awaited ``XADD`` per event (the
  same CloudEvents bytes);
* publish, 32 concurrent tasks: coalesced pipelines vs 32 tasks each awaiting ``XADD``;
* publish_many (batches of 100) vs a pipelined ``XADD`` batch of 100;
* consume: a group member handling pre-published events (decode + handler + batched
  ``XACK``) vs ``XREADGROUP COUNT 100`` + one ``XACK`` per batch, twice: on entries with
  one ``body`` field and no decoding (the issue's baseline), and like for like on the
  bus's own entries (flat fields) decoding each body with ``decode_event`` — the least
  any consumer of these events does;
* publish_many is likewise compared with pipelined ``XADD`` of the bus's own flat fields;
* end-to-end latency (publish -> handler) p50/p99 at a paced 1,000 events/s (median of
  ``--repeat`` runs; each run's figures are printed too).

Every run uses its own key prefix and deletes its keys at the end (never a flush).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from agentevents import Event, create_bus
from agentevents.core.codec import decode_event, encode_event


def make_events(n: int, type_: str = "bench.event") -> list[Event]:
    return [Event(type=type_, source="bench", payload={"i": i, "text": "x" * 64})
            for i in range(n)]


async def cleanup(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])
    await client.aclose()


def bus_url(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}&max_payload_bytes=1048576"


# -- agentevents --------------------------------------------------------------------------


async def ae_publish(url: str, n: int, mode: str) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bus = create_bus(bus_url(url, prefix))
    events = make_events(n)
    await bus.publish(events[0])  # connect, register the type
    start = time.perf_counter()
    if mode == "one":
        for event in events:
            await bus.publish(event)
    elif mode == "concurrent":
        async def worker(part: list[Event]) -> None:
            for event in part:
                await bus.publish(event)
        await asyncio.gather(*(worker(events[i::32]) for i in range(32)))
    else:
        for i in range(0, n, 100):
            await bus.publish_many(events[i : i + 100])
    elapsed = time.perf_counter() - start
    await bus.close()
    await cleanup(url, prefix)
    return n / elapsed


async def ae_consume(url: str, n: int) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bus = create_bus(bus_url(url, prefix))
    events = make_events(n)
    for i in range(0, n, 500):
        await bus.publish_many(events[i : i + 500])
    done = asyncio.Event()
    seen = 0

    async def handler(event: Event) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    start = time.perf_counter()
    await bus.subscribe("bench.>", handler, group="bench", start="earliest", max_in_flight=256)
    await done.wait()
    elapsed = time.perf_counter() - start
    await bus.close()
    await cleanup(url, prefix)
    return n / elapsed


async def ae_latency(url: str, n: int, rate: float) -> tuple[float, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bus = create_bus(bus_url(url, prefix))
    consumer = create_bus(bus_url(url, prefix))
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        at = sent.get(str(event.id))
        if at is None:
            return  # the warm-up event
        latencies.append(time.perf_counter() - at)
        if len(latencies) >= n:
            done.set()

    await consumer.subscribe("lat.>", handler, group="lat")
    await bus.publish(Event(type="lat.event"))  # the stream exists and is discovered
    await asyncio.sleep(1.5)
    latencies.clear()
    events = make_events(n, "lat.event")
    start = time.perf_counter()
    for i, event in enumerate(events):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[str(event.id)] = time.perf_counter()
        await bus.publish(event)
    await asyncio.wait_for(done.wait(), 60)
    await consumer.close()
    await bus.close()
    await cleanup(url, prefix)
    latencies.sort()
    return latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000


# -- raw redis-py -------------------------------------------------------------------------


def flat_fields(event: Event) -> dict[str, str | bytes]:
    """The entry the bus writes (see backends/redis): flat fields plus the CloudEvents body."""
    fields: dict[str, str | bytes] = {"id": str(event.id), "type": event.type}
    if event.key is not None:
        fields["key"] = event.key
    fields["source"] = event.source
    fields["time"] = event.time.isoformat()
    fields["body"] = encode_event(event)
    return fields


async def raw_publish(url: str, n: int, mode: str) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(url)
    events = make_events(n)
    bodies = [encode_event(e) for e in events]
    key = f"{prefix}:stream:bench.event"
    await client.ping()
    start = time.perf_counter()
    if mode == "flat":  # like for like: encoding and the bus's entry layout counted
        for i in range(0, n, 100):
            pipe = client.pipeline(transaction=False)
            for event in events[i : i + 100]:
                pipe.xadd(key, flat_fields(event))  # type: ignore[arg-type]
            await pipe.execute()
    elif mode == "one":
        for body in bodies:
            await client.xadd(key, {"body": body})
    elif mode == "concurrent":
        async def worker(part: list[bytes]) -> None:
            for body in part:
                await client.xadd(key, {"body": body})
        await asyncio.gather(*(worker(bodies[i::32]) for i in range(32)))
    else:
        for i in range(0, n, 100):
            pipe = client.pipeline(transaction=False)
            for body in bodies[i : i + 100]:
                pipe.xadd(key, {"body": body})
            await pipe.execute()
    elapsed = time.perf_counter() - start
    await client.aclose()
    await cleanup(url, prefix)
    return n / elapsed


async def raw_consume(url: str, n: int, like_for_like: bool = False) -> float:
    """XREADGROUP 100 + one XACK per batch; ``like_for_like``: the bus's entries, decoded."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(url)
    key = f"{prefix}:stream:bench.event"
    events = make_events(n)
    for i in range(0, n, 500):
        pipe = client.pipeline(transaction=False)
        for event in events[i : i + 500]:
            fields = flat_fields(event) if like_for_like else {"body": encode_event(event)}
            pipe.xadd(key, fields)  # type: ignore[arg-type]
        await pipe.execute()
    start = time.perf_counter()
    await client.xgroup_create(key, "raw", id="0")
    seen = 0
    while seen < n:
        result = await client.xreadgroup("raw", "c1", {key: ">"}, count=100, block=1000)
        for _stream, entries in result:
            ids = []
            for entry_id, fields in entries:
                if like_for_like:
                    decode_event(fields[b"body"])
                ids.append(entry_id)
            seen += len(ids)
            await client.xack(key, "raw", *ids)
    elapsed = time.perf_counter() - start
    await client.aclose()
    await cleanup(url, prefix)
    return n / elapsed


async def medians(ours: Callable[[], Awaitable[float]], raw: Callable[[], Awaitable[float]],
                  repeat: int) -> tuple[float, float]:
    """Median of ``repeat`` runs of each, taken in turns (ours, raw, ours, raw, ...), so
    that a slow spell of a shared machine weighs on both sides alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat):
        a.append(await ours())
        b.append(await raw())
    return statistics.median(a), statistics.median(b)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-events", type=int, default=5_000)
    args = parser.parse_args()
    n, url, repeat = args.events, args.url, args.repeat
    print(f"Redis bus vs raw redis-py, {n} events, median of {repeat}, {url}")
    rows = [
        ("publish (awaited, one by one)", lambda: ae_publish(url, n, "one"),
         lambda: raw_publish(url, n, "one"), "awaited XADD"),
        ("publish (32 concurrent tasks)", lambda: ae_publish(url, n, "concurrent"),
         lambda: raw_publish(url, n, "concurrent"), "32 tasks x awaited XADD"),
        ("publish_many (batches of 100)", lambda: ae_publish(url, n, "many"),
         lambda: raw_publish(url, n, "many"), "pipelined XADD x100"),
        ("publish_many (batches of 100)", lambda: ae_publish(url, n, "many"),
         lambda: raw_publish(url, n, "flat"), "same, bus's fields+encode"),
        ("consume (1 member, group)", lambda: ae_consume(url, n),
         lambda: raw_consume(url, n), "XREADGROUP 100 + XACK"),
        ("consume (1 member, group)", lambda: ae_consume(url, n),
         lambda: raw_consume(url, n, True), "same, bus's entries+decode"),
    ]
    for name, ours, raw, raw_name in rows:
        a, b = await medians(ours, raw, repeat)
        print(f"{name:34s} {a:10,.0f} ev/s | raw {raw_name:27s} {b:10,.0f} ev/s "
              f"| ratio {a / b:.2f}")
    runs = [await ae_latency(url, args.latency_events, 1000.0) for _ in range(repeat)]
    p50 = statistics.median(run[0] for run in runs)
    p99 = statistics.median(run[1] for run in runs)
    each = ", ".join(f"{run[0]:.2f}/{run[1]:.2f}" for run in runs)
    print(f"end-to-end latency at 1,000 ev/s ({args.latency_events} events, median of "
          f"{repeat} runs): p50 {p50:.2f} ms, p99 {p99:.2f} ms (runs p50/p99: {each})")


if __name__ == "__main__":
    asyncio.run(main())
