"""The bus conformance suite: what every bus backend must do (DESIGN.md section 2).

Run it against a backend with ``pytest --pyargs agentevents.conformance_tests --bus-url URL``,
or from a backend's own tests::

    from agentevents.conformance_tests.test_bus import *  # noqa: F403

    @pytest.fixture(scope="session")
    def bus_url() -> str:
        return "mybroker://127.0.0.1:1234"

The tests drive the public :class:`~agentevents.core.bus.Bus` interface only. Two documented
test hooks reach below it: ``bus.transport.send([OutboundMessage(...)])`` puts raw bytes on
the wire (as a foreign or broken producer would), and ``bus.transport.open_receiver(spec)``
plays a member that receives a message and then vanishes without acknowledging it.

Every event type, group and consumer name starts with the test's ``unique`` prefix, so the
suite can share a broker with other runs. Waits poll with a deadline; the only fixed sleeps
are the quiet periods of "this must not happen" checks. Tests that need a capability the
backend does not declare are skipped with that reason.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from agentevents.conformance_tests.helpers import (
    DELIVERY_TIMEOUT,
    QUIET_PERIOD,
    Collector,
    ConcurrencyProbe,
    make_event,
    poll,
    stay_quiet,
    wait_for,
)
from agentevents.conformance_tests.plugin import BusFactory
from agentevents.core.bus import Bus
from agentevents.core.codec import decode_event, encode_event
from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import BusClosedError, PayloadTooLargeError
from agentevents.core.event import Event
from agentevents.core.patterns import compile_pattern
from agentevents.core.transport import ConsumerSpec, InboundMessage, OutboundMessage, Receiver

pytestmark = [pytest.mark.bus_conformance, pytest.mark.asyncio]

#: Subscribe options that keep retries fast; ``ack_timeout`` stays comfortable so that a
#: busy broker does not redeliver (and so duplicate) in tests that expect exactly once.
FAST: dict[str, Any] = {"ack_timeout": 5.0, "retry_backoff": 0.01, "max_backoff": 0.05}
#: ``ack_timeout`` of the tests that wait for a redelivery.
SHORT_ACK_TIMEOUT = 1.0


def _require(bus: Bus, capability: str, why: str) -> None:
    if not getattr(bus.capabilities, capability):
        pytest.skip(f"backend does not declare {capability}: {why}")


def _duplicates(ids: Sequence[str]) -> dict[str, int]:
    return {event_id: n for event_id, n in Counter(ids).items() if n > 1}


async def _dead_letters(bus: Bus, group: str, count: int) -> list[DeadLetter]:
    return await poll(
        lambda: bus.dead_letters(group),
        lambda letters: len(letters) >= count,
        what=f"{count} dead letter(s) of group {group!r}",
    )


def _event_of(message: InboundMessage) -> Event:
    if message.event is not None:
        return message.event
    assert message.body is not None, "an inbound message has neither body nor event"
    return decode_event(message.body)


async def _receive_one(receiver: Receiver, timeout: float = DELIVERY_TIMEOUT) -> InboundMessage:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = await receiver.receive(1, min(1.0, max(deadline - time.monotonic(), 0.01)))
        if messages:
            assert len(messages) == 1, f"receive(1, ...) returned {len(messages)} messages"
            return messages[0]
    raise AssertionError(f"the raw receiver got nothing within {timeout:.1f} s")


# -- publishing and receiving -----------------------------------------------------------


class TestPublishSubscribe:
    """An event arrives intact, once, wherever it was published from."""

    async def test_round_trip_keeps_every_field(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher, consumer = await bus_factory(), await bus_factory()
        received = Collector("consumer")
        await consumer.subscribe(f"{unique}.order.>", received, group=f"{unique}-g", **FAST)
        sent = Event(
            type=f"{unique}.order.placed",
            version=2,
            time=datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC),
            source="agent-7",
            correlation_id="workflow-42",
            causation_id=str(uuid.uuid4()),
            key="order-42",
            payload={
                "text": "h\u00e9llo \u2713 \U0001f680",
                "count": 3,
                "ratio": 0.25,
                "big": 2**53,
                "flag": True,
                "nothing": None,
                "items": [1, "two", {"three": 3.5}],
                "nested": {"deep": {"deeper": [], "empty": {}}},
            },
            metadata={"tenant": "acme", "traceparent": "00-0af7651916cd43dd-b7ad6b71-01"},
        )
        await publisher.publish(sent)
        await received.wait_for_events([sent])
        got = received.events[0]
        for name in Event.model_fields:
            assert getattr(got, name) == getattr(sent, name), f"field {name!r} changed in transit"
        assert got == sent
        assert got.time.tzinfo is not None
        assert got.time.utcoffset() == UTC.utcoffset(None)
        await stay_quiet()
        assert received.ids == [str(sent.id)], "the event was handled more than once"

    async def test_publish_many_delivers_every_event_once(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher, consumer = await bus_factory(), await bus_factory()
        received = Collector("consumer")
        await consumer.subscribe(f"{unique}.batch.>", received, group=f"{unique}-g", **FAST)
        events = [make_event(unique, f"batch.kind{n % 3}", payload={"n": n}) for n in range(30)]
        await publisher.publish_many(events)
        await publisher.publish_many([])  # an empty batch is a no-op, not an error
        await received.wait_for_events(events)
        await stay_quiet()
        assert sorted(received.ids) == sorted(str(e.id) for e in events)

    async def test_earliest_group_gets_events_published_before_and_while_subscribed(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        _require(publisher, "replay", "start='earliest' replays retained events")
        before = [make_event(unique, "log.line", payload={"n": n}) for n in range(5)]
        await publisher.publish_many(before)
        consumer = await bus_factory()
        received = Collector("late group")
        await consumer.subscribe(
            f"{unique}.log.>", received, group=f"{unique}-g", start="earliest", **FAST
        )
        during = [make_event(unique, "log.line", payload={"n": n}) for n in range(5, 10)]
        for event in during:
            await publisher.publish(event)
        await received.wait_for_events(before + during)
        await stay_quiet()
        assert sorted(received.ids) == sorted(str(e.id) for e in before + during)


class TestLoad:
    """Many publishers, many members: nothing lost, nothing handled twice."""

    async def test_concurrent_publishers_and_members_lose_and_duplicate_nothing(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group = f"{unique}-workers"
        members = [await bus_factory() for _ in range(3)]
        collectors = [Collector(f"member-{i}") for i in range(3)]
        for member, collector in zip(members, collectors, strict=True):
            await member.subscribe(f"{unique}.load.>", collector, group=group, **FAST)
        publishers = [await bus_factory() for _ in range(2)]

        async def produce(task: int) -> list[Event]:
            events = [
                make_event(unique, f"load.kind{n % 3}", payload={"task": task, "n": n},
                           key=f"{unique}-t{task}" if task % 3 == 0 else None)
                for n in range(50)
            ]
            publisher = publishers[task % 2]
            if task % 2:
                for event in events:
                    await publisher.publish(event)
            else:
                for start in range(0, len(events), 10):
                    await publisher.publish_many(events[start : start + 10])
            return events

        batches = await asyncio.gather(*(produce(task) for task in range(10)))
        published = [event for batch in batches for event in batch]
        expected = {str(event.id) for event in published}
        assert len(expected) == 500

        def handled() -> list[str]:
            return [event_id for c in collectors for event_id in c.ids]

        await wait_for(
            lambda: expected <= set(handled()),
            what=lambda: f"all 500 events; {len(expected - set(handled()))} still missing",
        )
        await stay_quiet()
        ids = handled()
        assert set(ids) == expected, "the group handled events that were not published"
        assert not _duplicates(ids), (
            f"{len(_duplicates(ids))} event(s) handled more than once without any failure"
        )


# -- groups -------------------------------------------------------------------------------


class TestGroups:
    """Every group gets every event; members of one group share them."""

    async def test_every_group_gets_every_event(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        audit, billing = Collector("audit"), Collector("billing")
        await (await bus_factory()).subscribe(
            f"{unique}.sale.>", audit, group=f"{unique}-audit", **FAST
        )
        await (await bus_factory()).subscribe(
            f"{unique}.sale.>", billing, group=f"{unique}-billing", **FAST
        )
        events = [make_event(unique, "sale.made", payload={"n": n}) for n in range(20)]
        await publisher.publish_many(events)
        await audit.wait_for_events(events)
        await billing.wait_for_events(events)
        await stay_quiet()
        expected = sorted(str(e.id) for e in events)
        assert sorted(audit.ids) == expected
        assert sorted(billing.ids) == expected

    async def test_members_of_a_group_share_the_work(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group = f"{unique}-workers"
        collectors = [Collector(f"member-{i}", delay=0.02) for i in range(3)]
        for collector in collectors:
            member = await bus_factory()
            await member.subscribe(
                f"{unique}.job.>", collector, group=group, max_in_flight=1, **FAST
            )
        publisher = await bus_factory()
        # Distinct keys let partitioned brokers spread the events over every member.
        events = [
            make_event(unique, "job.queued", key=f"{unique}-k{n}", payload={"n": n})
            for n in range(30)
        ]
        await publisher.publish_many(events)
        await wait_for(
            lambda: sum(len(c.events) for c in collectors) >= len(events),
            what=lambda: f"30 events; got {[len(c.events) for c in collectors]} per member",
        )
        await stay_quiet()
        ids = [event_id for c in collectors for event_id in c.ids]
        assert sorted(ids) == sorted(str(e.id) for e in events), "lost or duplicated events"
        counts = [len(c.events) for c in collectors]
        assert all(counts), f"a member of the group got no work: events per member {counts}"

    @pytest.mark.parametrize("how", ["stop", "close"])
    async def test_group_that_was_away_gets_exactly_what_it_missed(
        self, bus_factory: BusFactory, unique: str, how: str
    ) -> None:
        publisher = await bus_factory()
        _require(publisher, "durable_groups", "a group that was away resumes where it was")
        group, pattern = f"{unique}-g", f"{unique}.doc.>"
        first_bus = await bus_factory()
        first = Collector("first run")
        subscription = await first_bus.subscribe(pattern, first, group=group, **FAST)
        seen = make_event(unique, "doc.created", payload={"n": 0})
        await publisher.publish(seen)
        await first.wait_for_events([seen])
        if how == "stop":
            await subscription.stop()
        else:
            await first_bus.close()

        missed = [make_event(unique, "doc.updated", payload={"n": n}) for n in range(1, 6)]
        await publisher.publish_many(missed[:2])
        for event in missed[2:]:
            await publisher.publish(event)

        back = Collector("second run")
        # start="latest" is ignored for a group that exists: it resumes where it was.
        await (await bus_factory()).subscribe(pattern, back, group=group, start="latest", **FAST)
        after = make_event(unique, "doc.deleted", payload={"n": 6})
        await publisher.publish(after)
        await back.wait_for_events([*missed, after])
        await stay_quiet()
        assert str(seen.id) not in back.ids, "an acknowledged event was delivered again"
        assert sorted(back.ids) == sorted(str(e.id) for e in [*missed, after])

    async def test_new_group_with_start_latest_skips_history(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        old = make_event(unique, "hist.old")
        await publisher.publish(old)
        received = Collector("latest group")
        await (await bus_factory()).subscribe(
            f"{unique}.hist.>", received, group=f"{unique}-g", start="latest", **FAST
        )
        new = make_event(unique, "hist.new")
        await publisher.publish(new)
        await received.wait_for_events([new])
        await stay_quiet()
        assert received.ids == [str(new.id)], "a start='latest' group replayed history"

    async def test_new_group_with_start_earliest_replays_history(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        _require(publisher, "replay", "start='earliest' replays retained events")
        old = [make_event(unique, "hist.old", payload={"n": n}) for n in range(3)]
        await publisher.publish_many(old)
        received = Collector("earliest group")
        await (await bus_factory()).subscribe(
            f"{unique}.hist.>", received, group=f"{unique}-g", start="earliest", **FAST
        )
        new = make_event(unique, "hist.new")
        await publisher.publish(new)
        await received.wait_for_events([*old, new])
        await stay_quiet()
        assert sorted(received.ids) == sorted(str(e.id) for e in [*old, new])

    async def test_start_applies_only_to_a_new_group(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        _require(publisher, "replay", "start='earliest' is accepted and replays")
        group, pattern = f"{unique}-g", f"{unique}.task.>"
        first = Collector("first member")
        await (await bus_factory()).subscribe(pattern, first, group=group, **FAST)
        done = make_event(unique, "task.done")
        await publisher.publish(done)
        await first.wait_for_events([done])

        joiner = Collector("joining member")
        await (await bus_factory()).subscribe(
            pattern, joiner, group=group, start="earliest", **FAST
        )
        await stay_quiet()
        ids = first.ids + joiner.ids
        assert ids.count(str(done.id)) == 1, (
            "a member joining an existing group with start='earliest' replayed what the "
            "group had already handled"
        )


# -- patterns -----------------------------------------------------------------------------


class TestPatterns:
    """NATS-style ``*`` (one token) and ``>`` (one or more trailing tokens)."""

    async def test_wildcard_matrix_including_types_first_published_later(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        u = unique
        first_round = [
            u,  # a type that is just the prefix
            f"{u}.code",
            f"{u}.code.build",
            f"{u}.code.build.failed",
            f"{u}.code.deploy.failed",
            f"{u}.code.build.failed.twice",
            f"{u}.task.failed",
            f"{u}.task.failed.again",
            f"{u}x.code.build.failed",  # same words, another first token
        ]
        later = f"{u}.code.test.failed"  # first published after round one was handled
        every = {*first_round, later}
        expectations: dict[str, set[str]] = {
            f"{u}.>": every - {u, f"{u}x.code.build.failed"},
            f"{u}.code.>": {
                f"{u}.code.build", f"{u}.code.build.failed", f"{u}.code.deploy.failed",
                f"{u}.code.build.failed.twice", later,
            },
            f"{u}.*.failed": {f"{u}.task.failed"},
            f"{u}.code.*.failed": {f"{u}.code.build.failed", f"{u}.code.deploy.failed", later},
            f"{u}.*": {f"{u}.code"},
            f"{u}.*.*": {f"{u}.code.build", f"{u}.task.failed"},
            f"{u}.*.build.>": {f"{u}.code.build.failed", f"{u}.code.build.failed.twice"},
            f"{u}.code.build.failed": {f"{u}.code.build.failed"},
        }
        subscriber = await bus_factory()
        collectors: dict[str, Collector] = {}
        for index, pattern in enumerate(expectations):
            collector = collectors[pattern] = Collector(pattern)
            await subscriber.subscribe(pattern, collector, group=f"{u}-p{index}", **FAST)
        # Bare wildcards cannot carry the prefix: subscribe ephemerally (no group is left
        # behind on a shared broker) and look only at this test's types.
        everything, single = Collector(">"), Collector("*")
        await subscriber.subscribe(">", everything, **FAST)
        await subscriber.subscribe("*", single, **FAST)
        expectations_bare = {">": (everything, every), "*": (single, {u})}

        def types(collector: Collector) -> list[str]:
            return [e.type for e in collector.events if e.type in every]

        def done(round_types: set[str]) -> bool:
            for pattern, collector in collectors.items():
                if not expectations[pattern] & round_types <= set(types(collector)):
                    return False
            return all(
                expected & round_types <= set(types(collector))
                for collector, expected in expectations_bare.values()
            )

        publisher = await bus_factory()
        await publisher.publish_many([Event(type=t) for t in first_round])
        await wait_for(lambda: done(set(first_round)), what="round one of the pattern matrix")
        await publisher.publish(Event(type=later))
        await wait_for(
            lambda: done(every),
            what=f"{later!r}, a type first published after the subscriptions started",
        )
        await stay_quiet()
        for pattern, collector in collectors.items():
            got = types(collector)
            assert sorted(got) == sorted(expectations[pattern]), f"pattern {pattern!r}"
        for pattern, (collector, expected) in expectations_bare.items():
            assert sorted(types(collector)) == sorted(expected), f"pattern {pattern!r}"


# -- ephemeral subscribers ---------------------------------------------------------------------


class TestEphemeral:
    """``group=None`` sees what is published while it is subscribed, nothing else."""

    async def test_sees_only_events_published_while_subscribed(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher, subscriber = await bus_factory(), await bus_factory()
        pattern = f"{unique}.note.>"
        probe = Collector("probe group")
        await (await bus_factory()).subscribe(pattern, probe, group=f"{unique}-probe", **FAST)
        before = make_event(unique, "note.before")
        await publisher.publish(before)
        await probe.wait_for_events([before])

        received = Collector("ephemeral")
        subscription = await subscriber.subscribe(pattern, received, **FAST)
        during = make_event(unique, "note.during")
        await publisher.publish(during)
        await received.wait_for_events([during])
        await subscription.stop()

        after = make_event(unique, "note.after")
        await publisher.publish(after)
        await probe.wait_for_events([after])
        await stay_quiet()
        assert received.ids == [str(during.id)]

    async def test_every_ephemeral_subscriber_gets_every_event(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        listeners = [Collector(f"listener-{i}") for i in range(3)]
        for index, listener in enumerate(listeners):
            bus = publisher if index == 0 else await bus_factory()
            await bus.subscribe(f"{unique}.ping.>", listener, **FAST)
        events = [make_event(unique, "ping.sent", payload={"n": n}) for n in range(10)]
        await publisher.publish_many(events)
        for listener in listeners:
            await listener.wait_for_events(events)
        await stay_quiet()
        for listener in listeners:
            assert sorted(listener.ids) == sorted(str(e.id) for e in events), listener.name


# -- retries and dead letters ------------------------------------------------------------------


class TestRetriesAndDeadLetters:
    """A raising handler is retried, then dead-lettered; bad input never stops a consumer."""

    @pytest.mark.parametrize("failures", [1, 3])
    async def test_failing_handler_is_retried_until_it_succeeds(
        self, bus_factory: BusFactory, unique: str, failures: int
    ) -> None:
        group = f"{unique}-g"
        received = Collector("flaky", fail=lambda event, attempt: attempt <= failures)
        consumer = await bus_factory()
        await consumer.subscribe(f"{unique}.flaky.>", received, group=group, max_attempts=5,
                                 **FAST)
        event = make_event(unique, "flaky.call")
        await (await bus_factory()).publish(event)
        await received.wait_for_events([event])
        await stay_quiet()
        assert received.attempts_of(event) == list(range(1, failures + 2))
        assert received.ids == [str(event.id)]
        assert all(call.group == group for call in received.calls)
        assert await consumer.dead_letters(group) == []

    async def test_always_failing_event_is_dead_lettered_and_the_group_moves_on(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group, pattern = f"{unique}-g", f"{unique}.work.>"
        received = Collector("picky", fail=lambda event, attempt: bool(event.payload["poison"]))
        consumer = await bus_factory()
        await consumer.subscribe(pattern, received, group=group, max_attempts=3, **FAST)
        publisher = await bus_factory()
        key = f"{unique}-key"
        poison = make_event(unique, "work.item", key=key, payload={"poison": True},
                            metadata={"tenant": "acme"}, correlation_id="c-1")
        behind = make_event(unique, "work.item", key=key, payload={"poison": False})
        await publisher.publish(poison)
        await publisher.publish(behind)  # same key: waits for the poison, then must flow

        letters = await _dead_letters(consumer, group, 1)
        await received.wait_for_events([behind])
        assert len(letters) == 1
        letter = letters[0]
        assert letter.group == group
        assert letter.pattern == pattern
        assert letter.topic == poison.type
        assert letter.event_id == str(poison.id)
        assert letter.event_type == poison.type
        assert letter.attempts == 3
        assert letter.error_type == "HandlerFailure"
        assert "planned failure" in letter.error
        assert decode_event(letter.original_bytes()) == poison
        assert received.attempts_of(poison) == [1, 2, 3]

        later = make_event(unique, "work.item", payload={"poison": False})
        await publisher.publish(later)
        await received.wait_for_events([later])
        await stay_quiet()
        assert str(poison.id) not in received.ids
        assert len(await consumer.dead_letters(group)) == 1

    async def test_dead_letters_are_kept_per_group(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        consumer = await bus_factory()

        def always(event: Event, attempt: int) -> bool:
            return True

        groups = [f"{unique}-a", f"{unique}-b"]
        for group in groups:
            await consumer.subscribe(f"{unique}.bad.>", Collector(group, fail=always),
                                     group=group, max_attempts=1, **FAST)
        event = make_event(unique, "bad.thing")
        await (await bus_factory()).publish(event)
        for group in groups:
            await _dead_letters(consumer, group, 1)
        await stay_quiet()
        for group in groups:
            letters = await consumer.dead_letters(group)
            assert [(d.group, d.event_id, d.attempts) for d in letters] == [
                (group, str(event.id), 1)
            ]

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            pytest.param(b"\x00\xff\xfe\x80 binary garbage", "JSON", id="not-utf8"),
            pytest.param(b"this is not json {", "JSON", id="not-json"),
            pytest.param(b"[1, 2, 3]", "object", id="json-array"),
            pytest.param(
                orjson.dumps({"specversion": "1.0", "id": str(uuid.uuid4()), "source": "x",
                              "type": "Not A Valid.Type", "data": {}}),
                "type",
                id="invalid-type-name",
            ),
            pytest.param(
                orjson.dumps({"specversion": "0.3", "id": "1", "source": "x", "type": "a.b"}),
                "specversion",
                id="wrong-specversion",
            ),
        ],
    )
    async def test_bad_input_is_dead_lettered_and_the_consumer_lives_on(
        self, bus_factory: BusFactory, unique: str, body: bytes, reason: str
    ) -> None:
        group, pattern = f"{unique}-g", f"{unique}.raw.>"
        received = Collector("consumer")
        consumer = await bus_factory()
        await consumer.subscribe(pattern, received, group=group, **FAST)
        producer = await bus_factory()
        topic = f"{unique}.raw.bad"
        await producer.transport.send(
            [OutboundMessage(id=str(uuid.uuid4()), topic=topic, key=None, body=body)]
        )
        letters = await _dead_letters(consumer, group, 1)
        letter = letters[0]
        assert letter.group == group
        assert letter.topic == topic
        assert letter.event_id is None
        assert letter.error_type == "EventValidationError"
        assert reason.lower() in letter.error.lower(), letter.error
        assert letter.original_bytes() == body, "the dead letter does not keep the raw bytes"
        assert letter.attempts >= 1

        good = make_event(unique, "raw.good")
        await producer.publish(good)
        await received.wait_for_events([good])
        await stay_quiet()
        assert received.ids == [str(good.id)]
        assert len(await consumer.dead_letters(group)) == 1


# -- ordering and flow control ------------------------------------------------------------------


async def _run_keyed_scenario(
    members: list[Bus], publisher: Bus, unique: str, *, keys: int, per_key: int
) -> tuple[dict[str, list[int]], ConcurrencyProbe]:
    """Publish ``per_key`` events on each of ``keys`` keys, interleaved; record handling."""
    order: dict[str, list[int]] = {}
    probe = ConcurrencyProbe()
    rng = random.Random(20240517)

    async def handler(event: Event) -> None:
        key = event.key
        assert key is not None
        probe.enter(key)
        try:
            await asyncio.sleep(rng.random() * 0.004)
            order.setdefault(key, []).append(int(event.payload["n"]))
        finally:
            probe.leave(key)

    for member in members:
        await member.subscribe(f"{unique}.seq.>", handler, group=f"{unique}-g",
                               max_in_flight=8, **FAST)
    names = [f"{unique}-key{k}" for k in range(keys)]
    events = [
        make_event(unique, f"seq.step{n % 2}", key=key, payload={"n": n})
        for n in range(per_key)
        for key in names
    ]
    for start in range(0, len(events), 10):
        await publisher.publish_many(events[start : start + 10])
    await wait_for(
        lambda: sum(map(len, order.values())) >= len(events),
        what=lambda: f"{len(events)} keyed events; got {sum(map(len, order.values()))}",
    )
    await stay_quiet()
    return order, probe


class TestOrdering:
    """Same key: one at a time, in publish order. Different keys: concurrently."""

    async def test_per_key_order_on_one_member_with_concurrency(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        # Every backend: a broker delivers to a lone member in publish order, and the core's
        # per-key lanes keep that order under concurrency. ``ordered_per_key`` declares more:
        # order across members (the next test).
        member = await bus_factory()
        order, probe = await _run_keyed_scenario(
            [member], await bus_factory(), unique, keys=4, per_key=25
        )
        for key, handled in sorted(order.items()):
            assert handled == list(range(25)), f"key {key!r} handled out of order: {handled}"
        assert not probe.overlapping_keys, "events of one key were handled concurrently"
        assert probe.peak > 1, "different keys never ran concurrently (max_in_flight=8)"

    async def test_same_key_is_never_handled_concurrently(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        order, probe = await _run_keyed_scenario(
            [await bus_factory()], await bus_factory(), unique, keys=3, per_key=15
        )
        assert sorted(n for handled in order.values() for n in handled) == sorted(
            n for n in range(15) for _ in range(3)
        )
        assert not probe.overlapping_keys, (
            f"keys {sorted(probe.overlapping_keys)} had two handlers running at once"
        )
        assert probe.peak > 1, "different keys never ran concurrently (max_in_flight=8)"

    async def test_per_key_order_across_members_of_a_group(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        members = [await bus_factory() for _ in range(3)]
        _require(members[0], "ordered_per_key", "events of one key reach a group in order")
        order, probe = await _run_keyed_scenario(
            members, await bus_factory(), unique, keys=6, per_key=15
        )
        for key, handled in sorted(order.items()):
            assert handled == list(range(15)), f"key {key!r} handled out of order: {handled}"
        assert not probe.overlapping_keys, "two members handled one key at the same time"


class TestFlowControl:
    """``max_in_flight`` bounds the handlers running at once, and is reached."""

    @pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "distinct-keys"])
    async def test_max_in_flight_is_respected_and_reached(
        self, bus_factory: BusFactory, unique: str, keyed: bool
    ) -> None:
        limit = 3
        probe = ConcurrencyProbe()
        gate = asyncio.Event()
        handled: list[Event] = []

        async def blocking(event: Event) -> None:
            probe.enter()
            try:
                await gate.wait()
            finally:
                probe.leave()
            handled.append(event)

        consumer = await bus_factory()
        await consumer.subscribe(f"{unique}.flow.>", blocking, group=f"{unique}-g",
                                 max_in_flight=limit, **FAST)
        events = [
            make_event(unique, "flow.item", key=f"{unique}-k{n}" if keyed else None,
                       payload={"n": n})
            for n in range(limit * 4)
        ]
        await (await bus_factory()).publish_many(events)
        try:
            await wait_for(lambda: probe.peak >= limit,
                           what=lambda: f"{limit} handlers at once; peak {probe.peak}")
            await stay_quiet()
            assert probe.peak == limit, f"{probe.peak} handlers ran at once, max_in_flight={limit}"
        finally:
            gate.set()
        await wait_for(lambda: len(handled) >= len(events),
                       what=lambda: f"{len(events)} events; got {len(handled)}")
        assert probe.peak == limit
        assert sorted(str(e.id) for e in handled) == sorted(str(e.id) for e in events)


# -- redelivery, stopping and closing -----------------------------------------------------------


class TestRedelivery:
    """What a member took and never acknowledged goes to another member after ack_timeout."""

    async def test_unacked_event_of_a_vanished_member_goes_to_another_member(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group, pattern = f"{unique}-g", f"{unique}.job.>"
        vanishing = await bus_factory()
        receiver = await vanishing.transport.open_receiver(
            ConsumerSpec(
                pattern=compile_pattern(pattern),
                group=group,
                start="latest",
                ack_timeout=SHORT_ACK_TIMEOUT,
                consumer=f"{unique}-vanished",
                max_in_flight=1,
                max_attempts=5,
            )
        )
        try:
            event = make_event(unique, "job.started", payload={"n": 1})
            await (await bus_factory()).publish(event)
            message = await _receive_one(receiver)
            taken_at = time.monotonic()
            assert _event_of(message) == event
            # The member now "vanishes": it never acks, extends or closes.

            survivor = Collector("survivor")
            await (await bus_factory()).subscribe(
                pattern, survivor, group=group, ack_timeout=SHORT_ACK_TIMEOUT,
                retry_backoff=0.01,
            )
            await survivor.wait_for_events([event])
            call = survivor.calls[0]
            waited = call.at - taken_at
            assert waited >= 0.8 * SHORT_ACK_TIMEOUT, (
                f"redelivered after {waited:.2f} s, before ack_timeout={SHORT_ACK_TIMEOUT} s "
                "had passed: the first delivery was not held for its member"
            )
            assert call.attempt >= 2, "a redelivery must count the earlier delivery"
            await stay_quiet()
            assert survivor.ids == [str(event.id)]
        finally:
            await receiver.close()

    async def test_a_handler_running_longer_than_ack_timeout_is_not_redelivered(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        """The member keeps what it works on alive (Receiver.extend): no duplicate."""
        group, pattern = f"{unique}-g", f"{unique}.long.>"
        members = [Collector(f"member {i}", delay=2.5) for i in range(2)]
        for member in members:
            await (await bus_factory()).subscribe(
                pattern, member, group=group, ack_timeout=SHORT_ACK_TIMEOUT, retry_backoff=0.01
            )
        event = make_event(unique, "long.job", payload={"n": 1})
        await (await bus_factory()).publish(event)
        await wait_for(lambda: any(m.events for m in members), what="the long job finished")
        await asyncio.sleep(SHORT_ACK_TIMEOUT)
        calls = [call for m in members for call in m.calls]
        assert len(calls) == 1, (
            f"the event was handled {len(calls)} times: a member working longer than "
            "ack_timeout must keep its message (extend), not let it be redelivered"
        )


class TestLifecycle:
    """Stopping and closing: drain what runs, hand back the rest, refuse further use."""

    @pytest.mark.parametrize("grouped", [True, False], ids=["group", "ephemeral"])
    async def test_stopped_subscription_receives_nothing_more(
        self, bus_factory: BusFactory, unique: str, grouped: bool
    ) -> None:
        pattern = f"{unique}.tick.>"
        probe = Collector("probe")
        await (await bus_factory()).subscribe(pattern, probe, group=f"{unique}-probe", **FAST)
        received = Collector("stopped")
        subscription = await (await bus_factory()).subscribe(
            pattern, received, group=f"{unique}-g" if grouped else None, **FAST
        )
        publisher = await bus_factory()
        first = make_event(unique, "tick.one")
        await publisher.publish(first)
        await received.wait_for_events([first])
        assert subscription.active
        await subscription.stop()
        assert not subscription.active
        await subscription.stop()  # idempotent

        rest = [make_event(unique, "tick.more", payload={"n": n}) for n in range(5)]
        await publisher.publish_many(rest)
        await probe.wait_for_events(rest)
        await stay_quiet()
        assert received.ids == [str(first.id)]

    async def test_close_lets_in_flight_handlers_finish_and_acks_them(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group, pattern = f"{unique}-g", f"{unique}.slow.>"
        started = asyncio.Event()
        finished: list[Event] = []
        cancelled: list[Event] = []

        async def slow(event: Event) -> None:
            started.set()
            try:
                await asyncio.sleep(0.3)
            except asyncio.CancelledError:
                cancelled.append(event)
                raise
            finished.append(event)

        closing = await bus_factory()
        await closing.subscribe(pattern, slow, group=group,
                                ack_timeout=SHORT_ACK_TIMEOUT, retry_backoff=0.01)
        publisher = await bus_factory()
        event = make_event(unique, "slow.work")
        await publisher.publish(event)
        async with asyncio.timeout(DELIVERY_TIMEOUT):
            await started.wait()
        await closing.close(timeout=5.0)
        closed_at = time.monotonic()
        assert not cancelled, "close() cancelled a handler that would have finished in time"
        assert finished == [event], "close() returned before the running handler finished"

        later = Collector("later member")
        await (await bus_factory()).subscribe(
            pattern, later, group=group, ack_timeout=SHORT_ACK_TIMEOUT, retry_backoff=0.01
        )
        marker = make_event(unique, "slow.marker")
        await publisher.publish(marker)
        await later.wait_for_events([marker])
        # Past the point where an unacknowledged delivery would have been redelivered.
        await asyncio.sleep(max(0.0, closed_at + SHORT_ACK_TIMEOUT + QUIET_PERIOD
                                - time.monotonic()))
        assert str(event.id) not in later.ids, (
            "the event finished during close() was redelivered: its ack was not flushed"
        )

    async def test_close_hands_back_events_not_yet_started(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group, pattern = f"{unique}-g", f"{unique}.queue.>"
        started = asyncio.Event()
        first_handled: list[Event] = []

        async def slow(event: Event) -> None:
            started.set()
            await asyncio.sleep(0.3)
            first_handled.append(event)

        closing = await bus_factory()
        # A long ack_timeout: the waiting event must be handed back, not merely expire.
        await closing.subscribe(pattern, slow, group=group, max_in_flight=2,
                                ack_timeout=60.0, retry_backoff=0.01)
        key = f"{unique}-key"
        running = make_event(unique, "queue.item", key=key, payload={"n": 1})
        waiting = make_event(unique, "queue.item", key=key, payload={"n": 2})
        await (await bus_factory()).publish_many([running, waiting])
        async with asyncio.timeout(DELIVERY_TIMEOUT):
            await started.wait()
        await closing.close(timeout=5.0)
        assert first_handled == [running]

        later = Collector("later member")
        await (await bus_factory()).subscribe(pattern, later, group=group, ack_timeout=60.0,
                                              retry_backoff=0.01)
        await later.wait_for_events([waiting])
        await stay_quiet()
        assert later.ids == [str(waiting.id)], "the handled event came back, or came twice"

    async def test_close_hands_back_a_keys_queued_events_in_order(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group, pattern = f"{unique}-g", f"{unique}.queue.>"
        started = asyncio.Event()

        async def slow(event: Event) -> None:
            started.set()
            await asyncio.sleep(0.3)

        closing = await bus_factory()
        await closing.subscribe(pattern, slow, group=group, max_in_flight=8,
                                ack_timeout=60.0, retry_backoff=0.01)
        key = f"{unique}-key"
        events = [make_event(unique, "queue.item", key=key, payload={"n": n}) for n in range(5)]
        await (await bus_factory()).publish_many(events)
        async with asyncio.timeout(DELIVERY_TIMEOUT):
            await started.wait()
        await asyncio.sleep(0.1)  # let the member take the rest of the key's events
        await closing.close(timeout=5.0)

        later = Collector("later member")
        await (await bus_factory()).subscribe(pattern, later, group=group, ack_timeout=60.0,
                                              retry_backoff=0.01)
        await later.wait_for_events(events[1:])
        await stay_quiet()
        assert [e.payload["n"] for e in later.events] == [1, 2, 3, 4], (
            "events of one key handed back at close must come back in publish order"
        )

    async def test_close_cancels_handlers_past_the_timeout_and_hands_back_their_events(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        group, pattern = f"{unique}-g", f"{unique}.stuck.>"
        started = asyncio.Event()
        cancelled: list[Event] = []

        async def stuck(event: Event) -> None:
            started.set()
            try:
                await asyncio.sleep(DELIVERY_TIMEOUT * 3)
            except asyncio.CancelledError:
                cancelled.append(event)
                raise

        closing = await bus_factory()
        # A long ack_timeout: the event must be handed back, not merely expire.
        await closing.subscribe(pattern, stuck, group=group, ack_timeout=60.0,
                                retry_backoff=0.01)
        event = make_event(unique, "stuck.work")
        await (await bus_factory()).publish(event)
        async with asyncio.timeout(DELIVERY_TIMEOUT):
            await started.wait()
        begun = time.monotonic()
        await closing.close(timeout=0.2)
        assert time.monotonic() - begun < 5.0, "close() did not respect its timeout"
        assert cancelled == [event]

        later = Collector("later member")
        await (await bus_factory()).subscribe(pattern, later, group=group, ack_timeout=60.0,
                                              retry_backoff=0.01)
        await later.wait_for_events([event])
        await stay_quiet()
        assert later.ids == [str(event.id)]

    async def test_closed_bus_refuses_to_publish_and_subscribe(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        bus = await bus_factory()
        await bus.close()
        await bus.close()  # idempotent
        event = make_event(unique, "late.event")
        with pytest.raises(BusClosedError):
            await bus.publish(event)
        with pytest.raises(BusClosedError):
            await bus.publish_many([event])
        with pytest.raises(BusClosedError):
            await bus.subscribe(f"{unique}.>", Collector())

    async def test_async_with_stops_subscriptions_and_closes(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        bus = await bus_factory()
        async with bus as entered:
            assert entered is bus
            subscription = await bus.subscribe(f"{unique}.>", Collector(), **FAST)
        assert not subscription.active
        with pytest.raises(BusClosedError):
            await bus.publish(make_event(unique, "late.event"))


# -- limits and broker extras -------------------------------------------------------------------


class TestLimits:
    """Declared payload limits are enforced at publish; declared dedupe works."""

    async def test_oversize_event_is_refused_at_publish_and_the_bus_still_works(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        limit = publisher.capabilities.max_payload_bytes
        if limit is None:
            pytest.skip("backend does not declare max_payload_bytes: it has no fixed limit")
        received = Collector("consumer")
        await (await bus_factory()).subscribe(f"{unique}.blob.>", received,
                                              group=f"{unique}-g", **FAST)
        base = make_event(unique, "blob.stored", payload={"blob": ""})
        at_limit = base.with_changes(payload={"blob": "x" * (limit - len(encode_event(base)))})
        assert len(encode_event(at_limit)) == limit
        too_big = make_event(unique, "blob.stored", payload={"blob": "x" * limit})
        with pytest.raises(PayloadTooLargeError) as refused:
            await publisher.publish(too_big)
        assert refused.value.limit == limit
        assert refused.value.size > limit
        with pytest.raises(PayloadTooLargeError):
            await publisher.publish_many([make_event(unique, "blob.small"), too_big])

        await publisher.publish(at_limit)  # exactly the declared limit is accepted
        small = make_event(unique, "blob.small")
        await publisher.publish(small)
        await received.wait_for_events([at_limit, small])
        await stay_quiet()
        assert str(too_big.id) not in received.ids
        assert received.events[received.ids.index(str(at_limit.id))] == at_limit

    async def test_broker_drops_a_repeated_event_id(
        self, bus_factory: BusFactory, unique: str
    ) -> None:
        publisher = await bus_factory()
        _require(publisher, "broker_dedupe", "a repeated event id is stored once")
        received = Collector("consumer")
        await (await bus_factory()).subscribe(f"{unique}.once.>", received,
                                              group=f"{unique}-g", **FAST)
        event = make_event(unique, "once.only")
        await publisher.publish(event)
        await publisher.publish(event)
        await publisher.publish_many([event])
        marker = make_event(unique, "once.marker")
        await publisher.publish(marker)
        await received.wait_for_events([event, marker])
        await stay_quiet()
        assert received.ids.count(str(event.id)) == 1
