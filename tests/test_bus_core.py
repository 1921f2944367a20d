"""Unit tests of the core delivery loop (``agentevents.core.bus``) that are not conformance.

The conformance suite (``tests/test_conformance_bus.py``) checks behaviour through a real
backend. These tests pin the core's own rules: option validation, ``current_delivery``,
backoff, error translation, and how the loop talks to a :class:`Receiver` (acks, nacks,
extends). They use a scripted in-test transport so each receiver call can be observed.
"""

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from agentevents.core.bus import Bus, Delivery, SubscriptionOptions, current_delivery
from agentevents.core.codec import encode_event
from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import (
    AgentEventsError,
    PayloadTooLargeError,
    PublishError,
    SubscribeError,
)
from agentevents.core.event import Event
from agentevents.core.transport import (
    Capabilities,
    ConsumerSpec,
    InboundMessage,
    OutboundMessage,
    Receiver,
    Transport,
)


class ScriptedReceiver(Receiver):
    """Hands out what the test puts in :attr:`inbox`; records every settlement."""

    def __init__(self, spec: ConsumerSpec) -> None:
        self.spec = spec
        self.inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self.asked: list[int] = []
        self.acked: list[InboundMessage] = []
        self.nacked: list[tuple[InboundMessage, float]] = []
        self.extended: list[InboundMessage] = []
        self.closed = False

    async def receive(self, max_messages: int, timeout: float) -> Sequence[InboundMessage]:
        self.asked.append(max_messages)
        try:
            first = await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return []
        out = [first]
        while len(out) < max_messages and not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        self.acked.extend(messages)

    async def nack(self, messages: Sequence[InboundMessage], delay: float = 0.0) -> None:
        self.nacked.extend((message, delay) for message in messages)

    async def extend(self, messages: Sequence[InboundMessage]) -> None:
        self.extended.extend(messages)

    async def close(self) -> None:
        self.closed = True


class ScriptedTransport(Transport):
    """A transport whose failures are chosen by the test."""

    def __init__(
        self,
        *,
        send_error: Exception | None = None,
        open_error: Exception | None = None,
        dead_letter_error: Exception | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        self.capabilities = Capabilities(max_payload_bytes=max_payload_bytes)
        self.send_error = send_error
        self.open_error = open_error
        self.dead_letter_error = dead_letter_error
        self.sent: list[OutboundMessage] = []
        self.receivers: list[ScriptedReceiver] = []
        self.letters: list[DeadLetter] = []
        self.closed = False

    async def send(self, messages: Sequence[OutboundMessage]) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.sent.extend(messages)

    async def open_receiver(self, spec: ConsumerSpec) -> Receiver:
        if self.open_error is not None:
            raise self.open_error
        receiver = ScriptedReceiver(spec)
        self.receivers.append(receiver)
        return receiver

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if self.dead_letter_error is not None:
            raise self.dead_letter_error
        self.letters.extend(letters)

    async def read_dead_letters(
        self, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        return [d for d in self.letters if group is None or d.group == group][:limit]

    async def close(self) -> None:
        self.closed = True


def inbound(event: Event, delivery_count: int = 1) -> InboundMessage:
    return InboundMessage(encode_event(event), event.type, delivery_count)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def noop(event: Event) -> None:
    return None


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"ack_timeout": 0}, "ack_timeout"),
        ({"ack_timeout": -1.0}, "ack_timeout"),
        ({"max_inflight": 4}, "unknown delivery option"),
        ({"group_name": "x"}, "unknown delivery option"),
        ({"retry_backoff": -0.1}, "retry_backoff"),
        ({"drain_timeout": -1}, "drain_timeout"),
    ],
)
@pytest.mark.asyncio
async def test_bad_subscribe_options_are_refused_before_subscribing(
    options: dict[str, Any], message: str
) -> None:
    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        with pytest.raises(SubscribeError, match=message):
            await bus.subscribe("a.>", noop, **options)
    assert transport.receivers == [], "a receiver was opened for an invalid subscription"


def test_bad_bus_defaults_are_refused_with_the_same_error() -> None:
    with pytest.raises(SubscribeError, match=r"unknown delivery option.*max_inflight"):
        Bus(ScriptedTransport(), max_inflight=3)
    with pytest.raises(SubscribeError, match="max_backoff"):
        Bus(ScriptedTransport(), max_backoff=-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group": ""}, "group"),
        ({"start": "middle"}, "start"),
    ],
)
@pytest.mark.asyncio
async def test_bad_group_or_start_is_refused(kwargs: dict[str, str], message: str) -> None:
    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        with pytest.raises(SubscribeError, match=message):
            await bus.subscribe("a.>", noop, **kwargs)  # type: ignore[arg-type]
    assert transport.receivers == []


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "A.b", "a.b*"])
@pytest.mark.asyncio
async def test_bad_pattern_is_refused(pattern: str) -> None:
    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        with pytest.raises(SubscribeError, match="pattern"):
            await bus.subscribe(pattern, noop)
    assert transport.receivers == []


def test_bus_defaults_are_validated_at_construction() -> None:
    with pytest.raises(SubscribeError, match="max_attempts"):
        Bus(ScriptedTransport(), max_attempts=0)


@pytest.mark.asyncio
async def test_subscribe_options_override_bus_defaults_and_reach_the_backend() -> None:
    transport = ScriptedTransport()
    async with Bus(transport, max_in_flight=7, max_attempts=4, ack_timeout=12.0) as bus:
        await bus.subscribe("a.>", noop, group="g", start="earliest", consumer="me")
        await bus.subscribe("a.>", noop, max_in_flight=2, ack_timeout=3.0)
        first, second = (receiver.spec for receiver in transport.receivers)
    assert (first.group, first.start, first.consumer) == ("g", "earliest", "me")
    assert (first.max_in_flight, first.max_attempts, first.ack_timeout) == (7, 4, 12.0)
    assert (second.group, second.max_in_flight, second.max_attempts) == (None, 2, 4)
    assert second.ack_timeout == 3.0
    assert second.consumer
    assert second.consumer != first.consumer


# -- backoff ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (6, 1.0), (40, 1.0)],
)
def test_backoff_is_exponential_and_capped(attempt: int, expected: float) -> None:
    options = SubscriptionOptions(retry_backoff=0.1, max_backoff=1.0)
    assert options.backoff(attempt) == pytest.approx(expected)


def test_zero_backoff_retries_at_once() -> None:
    assert SubscriptionOptions(retry_backoff=0.0).backoff(3) == 0.0


@pytest.mark.asyncio
async def test_retries_wait_the_backoff_between_attempts() -> None:
    calls: list[float] = []

    async def flaky(event: Event) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("not yet")

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", flaky, retry_backoff=0.05, max_backoff=1.0)
        receiver = transport.receivers[0]
        message = inbound(Event(type="a.b"))
        receiver.inbox.put_nowait(message)
        await eventually(lambda: message in receiver.acked)
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.045
    assert calls[2] - calls[1] >= 0.095
    assert calls[2] - calls[0] < 1.0


# -- current_delivery ---------------------------------------------------------------------


def test_current_delivery_outside_a_handler_raises() -> None:
    with pytest.raises(RuntimeError, match="inside a bus handler"):
        current_delivery()


def test_is_last_attempt() -> None:
    assert not Delivery(1, 3, "g", "a.>").is_last_attempt
    assert Delivery(3, 3, "g", "a.>").is_last_attempt
    assert Delivery(4, 3, None, "a.>").is_last_attempt


@pytest.mark.asyncio
async def test_current_delivery_inside_a_handler_and_broker_redeliveries_count() -> None:
    seen: list[Delivery] = []

    async def failing(event: Event) -> None:
        seen.append(current_delivery())
        raise ValueError("always")

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.*", failing, group="g", max_attempts=4, retry_backoff=0.0)
        receiver = transport.receivers[0]
        # The broker already delivered it twice (a member died holding it).
        message = inbound(Event(type="a.b"), delivery_count=3)
        receiver.inbox.put_nowait(message)
        await eventually(lambda: bool(transport.letters))
        with pytest.raises(RuntimeError):
            current_delivery()  # not leaked into the caller's context
    assert [d.attempt for d in seen] == [3, 4]
    assert seen[-1] == Delivery(4, 4, "g", "a.*")
    assert seen[-1].is_last_attempt
    assert transport.letters[0].attempts == 4
    assert message in receiver.acked


@pytest.mark.asyncio
async def test_bus_default_max_attempts_applies_to_subscriptions() -> None:
    calls = 0

    async def failing(event: Event) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("missing")

    transport = ScriptedTransport()
    async with Bus(transport, max_attempts=2, retry_backoff=0.0) as bus:
        await bus.subscribe("a.>", failing, group="g")
        transport.receivers[0].inbox.put_nowait(inbound(Event(type="a.b")))
        await eventually(lambda: bool(transport.letters))
    assert calls == 2
    letter = transport.letters[0]
    assert (letter.attempts, letter.error_type, letter.group) == (2, "KeyError", "g")
    assert letter.error == "'missing'"


# -- what the loop does with messages ---------------------------------------------------------


@pytest.mark.asyncio
async def test_non_matching_message_is_acked_unseen() -> None:
    handled: list[Event] = []

    async def handler(event: Event) -> None:
        handled.append(event)

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("code.*.failed", handler, group="g")
        receiver = transport.receivers[0]
        stray = inbound(Event(type="code.build.failed.twice"))  # a backend over-delivered
        wanted = inbound(Event(type="code.build.failed"))
        receiver.inbox.put_nowait(stray)
        receiver.inbox.put_nowait(wanted)
        await eventually(lambda: wanted in receiver.acked and stray in receiver.acked)
    assert [e.type for e in handled] == ["code.build.failed"]
    assert transport.letters == []


@pytest.mark.asyncio
async def test_undecodable_message_is_dead_lettered_and_acked() -> None:
    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", noop, group="g")
        receiver = transport.receivers[0]
        message = InboundMessage(b"\xff\xfe", "a.b", 1)
        receiver.inbox.put_nowait(message)
        await eventually(lambda: message in receiver.acked)
    (letter,) = transport.letters
    assert letter.body_base64
    assert letter.original_bytes() == b"\xff\xfe"
    assert (letter.error_type, letter.event_id, letter.topic) == (
        "EventValidationError", None, "a.b"
    )


@pytest.mark.asyncio
async def test_failed_dead_lettering_is_retried_and_keeps_the_key_blocked() -> None:
    handled: list[int] = []

    async def failing(event: Event) -> None:
        handled.append(event.payload["n"])
        if event.payload["n"] == 1:
            raise RuntimeError("boom")

    transport = ScriptedTransport(dead_letter_error=ConnectionError("dlq down"))
    tries = 0
    original = transport.dead_letter

    async def counting(letters: Sequence[DeadLetter]) -> None:
        nonlocal tries
        tries += 1
        if tries == 4:  # the dead-letter destination comes back
            transport.dead_letter_error = None
        await original(letters)

    transport.dead_letter = counting  # type: ignore[method-assign]
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", failing, max_attempts=1, retry_backoff=0.01,
                            max_backoff=0.02)
        receiver = transport.receivers[0]
        poison = Event(type="a.b", key="K", payload={"n": 1})
        first = inbound(poison)
        second = inbound(Event(type="a.b", key="K", payload={"n": 2}))
        receiver.inbox.put_nowait(first)
        receiver.inbox.put_nowait(second)
        await eventually(lambda: second in receiver.acked)
    assert tries == 4
    assert handled == [1, 2], "the key's next event ran before the failed one was settled"
    assert [letter.event_id for letter in transport.letters] == [str(poison.id)]
    assert receiver.acked.index(first) < receiver.acked.index(second)
    assert receiver.nacked == []


@pytest.mark.asyncio
async def test_unstorable_dead_letter_is_handed_back_at_stop_not_acked() -> None:
    async def failing(event: Event) -> None:
        raise RuntimeError("boom")

    transport = ScriptedTransport(dead_letter_error=ConnectionError("dlq down"))
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", failing, max_attempts=1, retry_backoff=0.01,
                            max_backoff=0.02)
        receiver = transport.receivers[0]
        message = inbound(Event(type="a.b"))
        receiver.inbox.put_nowait(message)
        await asyncio.sleep(0.2)
        assert message not in receiver.acked
    assert receiver.nacked == [(message, 0.0)]
    assert message not in receiver.acked


@pytest.mark.asyncio
async def test_same_key_runs_in_arrival_order_one_at_a_time_other_keys_concurrently() -> None:
    order: dict[str, list[int]] = {"k": [], "j": []}
    running: dict[str, int] = {"k": 0, "j": 0}
    overlaps: list[str] = []
    peak = 0

    async def handler(event: Event) -> None:
        nonlocal peak
        key = event.key
        assert key is not None
        running[key] += 1
        peak = max(peak, sum(running.values()))
        if running[key] > 1:
            overlaps.append(key)
        await asyncio.sleep(0.02 if event.payload["n"] % 2 == 0 else 0.001)
        order[key].append(int(event.payload["n"]))
        running[key] -= 1

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", handler, max_in_flight=16)
        receiver = transport.receivers[0]
        for n in range(6):  # one batch: the core, not the broker, must keep the order
            for key in ("k", "j"):
                receiver.inbox.put_nowait(inbound(Event(type="a.b", key=key, payload={"n": n})))
        await eventually(lambda: len(receiver.acked) == 12)
    assert order == {"k": list(range(6)), "j": list(range(6))}
    assert overlaps == []
    assert peak == 2


@pytest.mark.asyncio
async def test_stop_hands_back_queued_events_of_a_key() -> None:
    started = asyncio.Event()

    async def slow(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.2)

    transport = ScriptedTransport()
    bus = Bus(transport)
    subscription = await bus.subscribe("a.>", slow, group="g")
    receiver = transport.receivers[0]
    running = inbound(Event(type="a.b", key="k"))
    queued = inbound(Event(type="a.b", key="k"))
    receiver.inbox.put_nowait(running)
    receiver.inbox.put_nowait(queued)
    await asyncio.wait_for(started.wait(), 5)
    await subscription.stop(timeout=5.0)
    assert receiver.acked == [running]
    assert receiver.nacked == [(queued, 0.0)]
    await bus.close()


@pytest.mark.asyncio
async def test_receive_never_asks_for_more_than_max_in_flight() -> None:
    release = asyncio.Event()

    async def blocked(event: Event) -> None:
        await release.wait()

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", blocked, max_in_flight=2)
        receiver = transport.receivers[0]
        messages = [inbound(Event(type="a.b")) for _ in range(5)]
        for message in messages:
            receiver.inbox.put_nowait(message)
        await eventually(lambda: receiver.inbox.qsize() == 3)
        await asyncio.sleep(0.05)
        assert receiver.inbox.qsize() == 3, "more than max_in_flight messages were taken"
        release.set()
        await eventually(lambda: len(receiver.acked) == 5)
    assert max(receiver.asked) <= 2


@pytest.mark.asyncio
async def test_long_handlers_keep_their_messages_alive() -> None:
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.5)

    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.subscribe("a.>", slow, ack_timeout=0.3)
        receiver = transport.receivers[0]
        message = inbound(Event(type="a.b"))
        receiver.inbox.put_nowait(message)
        await eventually(lambda: message in receiver.acked)
    assert message in receiver.extended


@pytest.mark.asyncio
async def test_stop_cancels_handlers_past_the_timeout_and_hands_them_back() -> None:
    started = asyncio.Event()

    async def stuck(event: Event) -> None:
        started.set()
        await asyncio.sleep(3600)

    transport = ScriptedTransport()
    bus = Bus(transport)
    subscription = await bus.subscribe("a.>", stuck, group="g")
    receiver = transport.receivers[0]
    message = inbound(Event(type="a.b"))
    receiver.inbox.put_nowait(message)
    await asyncio.wait_for(started.wait(), 5)
    begun = time.monotonic()
    await subscription.stop(timeout=0.1)
    assert time.monotonic() - begun < 2.0
    assert receiver.nacked == [(message, 0.0)]
    assert message not in receiver.acked
    assert receiver.closed
    await bus.close()
    assert transport.closed


# -- errors at the edge -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_untranslated_send_error_becomes_publish_error() -> None:
    cause = RuntimeError("socket closed")
    bus = Bus(ScriptedTransport(send_error=cause), url="redis://user:s3cret@host:6379/0")
    with pytest.raises(PublishError) as raised:
        await bus.publish(Event(type="a.b"))
    assert raised.value.__cause__ is cause
    assert "s3cret" not in str(raised.value)
    await bus.close()


@pytest.mark.asyncio
async def test_translated_send_error_passes_through() -> None:
    error = PublishError("broker refused")
    bus = Bus(ScriptedTransport(send_error=error))
    with pytest.raises(PublishError) as raised:
        await bus.publish_many([Event(type="a.b")])
    assert raised.value is error
    await bus.close()


@pytest.mark.asyncio
async def test_open_receiver_error_becomes_subscribe_error() -> None:
    bus = Bus(ScriptedTransport(open_error=OSError("no route")))
    with pytest.raises(SubscribeError, match="no route") as raised:
        await bus.subscribe("a.>", noop)
    assert isinstance(raised.value.__cause__, OSError)
    await bus.close()


@pytest.mark.asyncio
async def test_size_limit_is_checked_before_sending() -> None:
    event = Event(type="a.b", payload={"x": "y" * 100})
    size = len(encode_event(event))
    transport = ScriptedTransport(max_payload_bytes=size - 1)
    async with Bus(transport) as bus:
        with pytest.raises(PayloadTooLargeError) as raised:
            await bus.publish_many([Event(type="a.b"), event])
        assert (raised.value.size, raised.value.limit) == (size, size - 1)
        assert isinstance(raised.value, AgentEventsError)
        assert transport.sent == [], "part of a batch was sent although one event was too big"


@pytest.mark.asyncio
async def test_empty_batch_sends_nothing() -> None:
    transport = ScriptedTransport()
    async with Bus(transport) as bus:
        await bus.publish_many([])
    assert transport.sent == []


def test_repr_hides_secrets() -> None:
    bus = Bus(ScriptedTransport(), url="redis://user:s3cret@host:6379/0")
    assert "s3cret" not in repr(bus)
    assert "host" in repr(bus)
