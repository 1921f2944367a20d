"""Benchmarks of the NATS JetStream bus against raw nats-py, in one run.

Run by hand (never in CI), against a local server with JetStream::

    .venv/bin/python benchmarks/bench_nats.py                       # 20k events, 3 repeats
    .venv/bin/python benchmarks/bench_nats.py --url nats://127.0.0.1:4222 --events 50000

Figures (median of ``--repeat`` runs, each on a fresh stream deleted afterwards; the rows
of a section run round-robin, so that a machine whose speed drifts slows them alike):

* publish: agentevents ``publish_many`` (batches of 1,000) vs raw ``js.publish_async`` with
  a window of 1,000 pending PubAcks, then waiting for all of them;
* consume: a group (``start="earliest"``, ``max_in_flight=256``) draining N stored events
  with a no-op handler vs raw pull (``fetch(256)`` + ``ack``), raw push (callback +
  ``ack``) consumers, and a raw pull loop on a callback subscription (pull requests of
  256 to ``$JS.API.CONSUMER.MSG.NEXT``, two kept open, answered on the loop's own inbox:
  what the bus's receiver does) + ``ack``; the "+decode" rows also ``decode_event`` each
  body, as any consumer of these events must;
* end to end: p50/p99 latency from ``publish`` to the handler at a paced 1,000 events/s
  (median of ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from agentevents import Event, create_bus


def _events(n: int) -> list[Event]:
    return [Event(type="bench.event", source="bench", payload={"i": i, "text": "x" * 64})
            for i in range(n)]


class Bench:
    def __init__(self, url: str, events: int) -> None:
        self.url = url
        self.n = events

    def _names(self) -> tuple[str, str]:
        tag = uuid.uuid4().hex[:8]
        return f"BENCH_{tag}", f"bench{tag}"

    def _bus_url(self, stream: str, prefix: str) -> str:
        return f"{self.url}?stream={stream}&prefix={prefix}&max_age=1h"

    async def _drop(self, stream: str) -> None:
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        for name in (stream, f"{stream}_DLQ"):
            try:
                await js.delete_stream(name)
            except Exception:  # the DLQ stream may not exist
                continue
        await nc.close()

    async def _raw_stream(self) -> tuple[NatsClient, str, str]:
        stream, prefix = self._names()
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"]))
        return nc, stream, prefix

    async def _fill_raw(self, nc: NatsClient, prefix: str) -> None:
        js = nc.jetstream(publish_async_max_pending=1000)
        body = _events(1)[0]
        from agentevents.core.codec import encode_event

        data = encode_event(body)
        for i in range(self.n):
            await js.publish_async(f"{prefix}.bench.event", data,
                                   headers={"Nats-Msg-Id": f"{i}-{uuid.uuid4().hex}"})
        await js.publish_async_completed()

    # -- publish ---------------------------------------------------------------------------

    async def ae_publish(self) -> float:
        stream, prefix = self._names()
        bus = create_bus(self._bus_url(stream, prefix))
        events = _events(self.n)
        await bus.publish(Event(type="bench.warmup"))
        start = time.perf_counter()
        for i in range(0, self.n, 1000):
            await bus.publish_many(events[i : i + 1000])
        elapsed = time.perf_counter() - start
        await bus.close()
        await self._drop(stream)
        return self.n / elapsed

    async def raw_publish(self) -> float:
        nc, stream, prefix = await self._raw_stream()
        from agentevents.core.codec import encode_event

        bodies = [encode_event(e) for e in _events(self.n)]  # encoding counted separately
        js = nc.jetstream(publish_async_max_pending=1000)
        start = time.perf_counter()
        for i, body in enumerate(bodies):
            await js.publish_async(f"{prefix}.bench.event", body,
                                   headers={"Nats-Msg-Id": str(i)})
        await js.publish_async_completed()
        elapsed = time.perf_counter() - start
        await nc.close()
        await self._drop(stream)
        return self.n / elapsed

    # -- consume ---------------------------------------------------------------------------

    async def ae_consume(self) -> float:
        stream, prefix = self._names()
        url = self._bus_url(stream, prefix)
        publisher = create_bus(url)
        events = _events(self.n)
        for i in range(0, self.n, 1000):
            await publisher.publish_many(events[i : i + 1000])
        await publisher.close()
        bus = create_bus(url)
        done = asyncio.Event()
        seen = 0

        async def handler(event: Event) -> None:
            nonlocal seen
            seen += 1
            if seen == self.n:
                done.set()

        start = time.perf_counter()
        await bus.subscribe("bench.>", handler, group="bench", start="earliest",
                            max_in_flight=256)
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - start
        await bus.close()
        await self._drop(stream)
        return self.n / elapsed

    async def raw_pull(self) -> float:
        nc, stream, prefix = await self._raw_stream()
        await self._fill_raw(nc, prefix)
        js = nc.jetstream()
        start = time.perf_counter()
        sub = await js.pull_subscribe(f"{prefix}.>", durable="rawpull", stream=stream)
        seen = 0
        while seen < self.n:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
            seen += len(msgs)
        await nc.flush()
        elapsed = time.perf_counter() - start
        await nc.close()
        await self._drop(stream)
        return self.n / elapsed

    async def raw_push(self, decode: bool = False) -> float:
        """Push callback + ack; ``decode``: also ``decode_event`` each body, as any
        consumer of these events must (the bare baseline decodes nothing)."""
        from agentevents.core.codec import decode_event

        nc, stream, prefix = await self._raw_stream()
        await self._fill_raw(nc, prefix)
        js = nc.jetstream()
        done = asyncio.Event()
        seen = 0

        async def on(msg: Msg) -> None:
            nonlocal seen
            if decode:
                decode_event(msg.data)
            await msg.ack()
            seen += 1
            if seen == self.n:
                done.set()

        start = time.perf_counter()
        await js.subscribe(f"{prefix}.>", cb=on, stream=stream, manual_ack=True,
                           config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                 deliver_policy=DeliverPolicy.ALL,
                                                 max_ack_pending=1000))
        await asyncio.wait_for(done.wait(), 300)
        await nc.flush()
        elapsed = time.perf_counter() - start
        await nc.close()
        await self._drop(stream)
        return self.n / elapsed

    async def raw_pull_callback(self, decode: bool = False) -> float:
        """Pull requests answered on a callback subscription to our own inbox + ``ack``.

        Two requests of 256 are kept open (the next one is sent as soon as one has been
        delivered in full), so the server always has one to fill while the callback acks.
        """
        from agentevents.core.codec import decode_event

        nc, stream, prefix = await self._raw_stream()
        await self._fill_raw(nc, prefix)
        js = nc.jetstream()
        batch = 256
        request = b'{"batch":%d,"expires":%d}' % (batch, 5_000_000_000)
        inbox = nc.new_inbox()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.rawcb"
        done = asyncio.Event()
        seen = 0
        due = 0  # messages the open requests still owe

        async def pull() -> None:
            nonlocal due
            due += batch
            await nc.publish(subject, request, reply=inbox)

        async def on(msg: Msg) -> None:
            nonlocal seen, due
            if not msg.reply:  # a status (408: a request expired): pull again
                due = 0
                await pull()
                await pull()
                return
            if decode:
                decode_event(msg.data)
            await msg.ack()
            seen += 1
            due -= 1
            if seen == self.n:
                done.set()
            elif due <= batch:
                await pull()

        start = time.perf_counter()
        await js.add_consumer(stream, ConsumerConfig(
            durable_name="rawcb", ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, filter_subject=f"{prefix}.>",
            max_ack_pending=10_000))
        await nc.subscribe(inbox, cb=on)
        await pull()
        await pull()
        await asyncio.wait_for(done.wait(), 300)
        await nc.flush()
        elapsed = time.perf_counter() - start
        await nc.close()
        await self._drop(stream)
        return self.n / elapsed

    # -- latency ---------------------------------------------------------------------------

    async def e2e_latency(self, rate: int, seconds: float) -> tuple[float, float, float]:
        stream, prefix = self._names()
        url = self._bus_url(stream, prefix)
        publisher, consumer = create_bus(url), create_bus(url)
        latencies: list[float] = []
        total = int(rate * seconds)
        done = asyncio.Event()

        async def handler(event: Event) -> None:
            latencies.append(time.perf_counter() - float(event.payload["t"]))
            if len(latencies) >= total:
                done.set()

        await consumer.subscribe("lat.>", handler, group="lat")
        await publisher.publish(Event(type="warm.up"))
        begin = time.perf_counter()
        for i in range(total):
            due = begin + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            await publisher.publish(Event(type="lat.tick", payload={"t": time.perf_counter()}))
        await asyncio.wait_for(done.wait(), 60)
        await consumer.close()
        await publisher.close()
        await self._drop(stream)
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        return p50, p99, latencies[-1] * 1000


async def _interleaved(runs: dict[str, Callable[[], Awaitable[float]]],
                       repeat: int) -> dict[str, list[float]]:
    """Each run ``repeat`` times, round-robin: on a machine whose speed drifts (shared
    cores), every row then sees the same drift and the ratios between rows hold better
    than when each row's repeats run back to back."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            results[name].append(await run())
    return results


def _row(label: str, values: list[float], base: float | None = None) -> str:
    value = statistics.median(values)
    text = f"{label:39} {value:10,.0f} ev/s   (range {min(values):,.0f}-{max(values):,.0f})"
    return text if base is None else f"{text}   ratio {base / value:.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    bench = Bench(args.url, args.events)
    print(f"NATS JetStream at {args.url}: {args.events} events, median of {args.repeat} "
          "(rows of a section run interleaved); ratio = agentevents / that row")
    publish = await _interleaved({
        "agentevents publish_many": bench.ae_publish,
        "raw js.publish_async": bench.raw_publish,
    }, args.repeat)
    ae_pub = statistics.median(publish["agentevents publish_many"])
    for name, values in publish.items():
        print(_row(f"publish  {name}", values, None if name.startswith("agentevents")
                   else ae_pub))
    consume = await _interleaved({
        "agentevents group": bench.ae_consume,
        "raw pull fetch(256)+ack": bench.raw_pull,
        "raw push cb+ack": bench.raw_push,
        "raw push cb+decode+ack": lambda: bench.raw_push(decode=True),
        "raw pull on cb sub+ack": bench.raw_pull_callback,
        "raw pull on cb sub+decode+ack": lambda: bench.raw_pull_callback(decode=True),
    }, args.repeat)
    ae_con = statistics.median(consume["agentevents group"])
    for name, values in consume.items():
        print(_row(f"consume  {name}", values, None if name.startswith("agentevents")
                   else ae_con))
    runs = [await bench.e2e_latency(args.rate, args.seconds) for _ in range(args.repeat)]
    p50s, p99s, worst = zip(*runs, strict=True)
    print(f"e2e at {args.rate} ev/s for {args.seconds:g} s, median of {args.repeat}: "
          f"p50 {statistics.median(p50s):.2f} ms, p99 {statistics.median(p99s):.2f} ms "
          f"(p99 range {min(p99s):.2f}-{max(p99s):.2f}), max {max(worst):.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
