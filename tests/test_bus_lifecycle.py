"""Lifecycle edge cases of the delivery loop found in review: poison bodies, stopping from
inside a handler, cancelled stops, publishing while draining, over-delivered messages."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from test_bus_core import ScriptedTransport, eventually, inbound

from agentevents import Bus, BusClosedError, Event, create_bus, create_store
from agentevents.core.transport import ConsumerSpec, OutboundMessage, Receiver

pytestmark = pytest.mark.asyncio


def memory_bus() -> Bus:
    return create_bus(f"memory://lifecycle-{uuid.uuid4().hex[:8]}", retry_backoff=0.01,
                      max_backoff=0.02)


async def test_an_out_of_range_time_is_dead_lettered_and_the_consumer_lives_on() -> None:
    seen: list[str] = []

    async def handler(event: Event) -> None:
        seen.append(event.type)

    async with memory_bus() as bus:
        sub = await bus.subscribe("a.>", handler, group="g")
        body = (b'{"specversion":"1.0","id":"01a2128a-b693-77c6-baf2-fd2fe7612bca",'
                b'"source":"s","type":"a.b","time":"0001-01-01T00:00:00+01:00","data":{}}')
        await bus.transport.send([OutboundMessage(id="x", topic="a.b", key=None, body=body)])
        await bus.publish(Event(type="a.c"))
        await eventually(lambda: seen == ["a.c"])
        letters = await bus.dead_letters("g")
        assert [letter.error_type for letter in letters] == ["EventValidationError"]
        assert "out of range" in letters[0].error
        assert sub.active


async def test_handlers_may_publish_while_the_bus_drains() -> None:
    started = asyncio.Event()
    follow_ups: list[Event] = []

    async def slow_then_publish(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.2)
        await bus.publish(event.caused("a.done"))

    name = f"memory://lifecycle-{uuid.uuid4().hex[:8]}"
    bus = create_bus(name)
    async with create_bus(name) as observer:
        async def collect(event: Event) -> None:
            follow_ups.append(event)

        await observer.subscribe("a.done", collect)
        await bus.subscribe("a.start", slow_then_publish, group="g")
        await bus.publish(Event(type="a.start"))
        await started.wait()
        await bus.close()
        assert await bus.dead_letters("g") == []
        await eventually(lambda: len(follow_ups) == 1)
    with pytest.raises(BusClosedError):
        await bus.publish(Event(type="a.late"))


async def test_a_handler_may_stop_its_own_subscription() -> None:
    calls = 0

    async def stop_myself(event: Event) -> None:
        nonlocal calls
        calls += 1
        await sub.stop()

    async with memory_bus() as bus:
        sub = await bus.subscribe("a.b", stop_myself, group="g", drain_timeout=5.0)
        await bus.publish(Event(type="a.b"))
        await eventually(lambda: not sub.active)
        await asyncio.wait_for(sub.stop(), 2.0)  # completes, does not wait on itself
        await bus.publish(Event(type="a.b"))
        await asyncio.sleep(0.1)
    assert calls == 1


async def test_a_cancelled_stop_still_completes() -> None:
    release = asyncio.Event()

    async def blocked(event: Event) -> None:
        await release.wait()

    bus = memory_bus()
    sub = await bus.subscribe("a.b", blocked, group="g", drain_timeout=5.0)
    await bus.publish(Event(type="a.b"))
    await asyncio.sleep(0.05)
    first = asyncio.create_task(sub.stop())
    await asyncio.sleep(0.05)
    first.cancel()
    release.set()
    await asyncio.wait_for(sub.stop(), 2.0)
    await asyncio.wait_for(bus.close(), 2.0)


async def test_a_message_delivered_far_beyond_max_attempts_is_dead_lettered_unhandled() -> None:
    calls = 0

    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", handler, max_attempts=3)
        receiver = transport.receivers[0]
        message = inbound(Event(type="a.b"), delivery_count=7)
        receiver.inbox.put_nowait(message)
        await eventually(lambda: message in receiver.acked)
    assert calls == 0
    (letter,) = transport.letters
    assert letter.attempts == 7
    assert "crashed" in letter.error


async def test_hand_backs_within_the_margin_still_run_the_handler() -> None:
    calls = 0

    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", handler, max_attempts=1)
        receiver = transport.receivers[0]
        message = inbound(Event(type="a.b"), delivery_count=2)  # handed back once at a stop
        receiver.inbox.put_nowait(message)
        await eventually(lambda: message in receiver.acked)
    assert calls == 1
    assert transport.letters == []


class SlowOpenTransport(ScriptedTransport):
    async def open_receiver(self, spec: ConsumerSpec) -> Receiver:
        await asyncio.sleep(0.2)
        return await super().open_receiver(spec)


async def test_subscribe_racing_close_does_not_leave_a_live_subscription() -> None:
    async def handler(event: Event) -> None:
        return None

    transport = SlowOpenTransport()
    bus = Bus(transport)
    subscribing = asyncio.create_task(bus.subscribe("a.b", handler))
    await asyncio.sleep(0.05)
    await bus.close()
    with pytest.raises(BusClosedError):
        await subscribing
    assert transport.receivers[0].closed


async def test_memory_members_time_out_at_their_own_ack_timeout() -> None:
    calls: dict[str, int] = {}

    async def slow(event: Event) -> None:
        calls[event.payload["n"]] = calls.get(event.payload["n"], 0) + 1
        await asyncio.sleep(1.0)

    async def noop(event: Event) -> None:
        return None

    async with memory_bus() as bus:
        first = await bus.subscribe("a.b", noop, group="g", ack_timeout=0.3)
        await first.stop()  # the group was created with a short ack_timeout...
        await bus.subscribe("a.b", slow, group="g", ack_timeout=5.0)  # ...today's is longer
        await bus.subscribe("a.b", slow, group="g", ack_timeout=5.0)
        await bus.publish_many([Event(type="a.b", payload={"n": str(n)}) for n in range(4)])
        await asyncio.sleep(1.6)
    assert calls == {str(n): 1 for n in range(4)}


async def test_memory_store_readers_cannot_rewrite_history() -> None:
    store = create_store(f"memory://history-{uuid.uuid4().hex[:8]}")
    await store.append("acct", [Event(type="a.b", payload={"balance": 10},
                                      metadata={"tenant": "t"})])
    for read in (await store.read_stream("acct"), await store.read_all()):
        read[0].event.payload["balance"] = 1_000_000
        read[0].event.metadata["tenant"] = "evil"
    (again,) = await store.read_stream("acct")
    assert again.event.payload == {"balance": 10}
    assert again.event.metadata == {"tenant": "t"}
    await store.close()
