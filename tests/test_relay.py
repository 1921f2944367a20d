"""The outbox relay with the memory store and the memory bus: order, the lease (one active
relay, takeover, fencing), at-least-once after failed publishes, stopping, and the CLI.

The bus is a real :class:`Bus` on the memory transport, instrumented to record what reached
the broker, in order, and to fail on demand (a broker that is down, or that accepts part of
a batch and then fails).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
from typer.testing import CliRunner

from agentevents.backends.memory import MemoryTransport
from agentevents.cli import app
from agentevents.conformance_tests.helpers import Collector, wait_for
from agentevents.core.bus import Bus
from agentevents.core.errors import (
    ConfigurationError,
    LeaseLostError,
    OutboxNotEnabledError,
    StoreClosedError,
)
from agentevents.core.event import Event
from agentevents.core.store import RecordedEvent
from agentevents.core.transport import OutboundMessage
from agentevents.relay import OutboxRelay
from agentevents.stores.memory import MemoryEventStore


class RecordingTransport(MemoryTransport):
    """The memory transport; records what the broker accepted, in order; fails on demand.

    ``failures`` sends fail, after accepting their first ``accept_before_failing``
    messages; ``gate``, when set, holds every send until it is opened; ``delay`` makes every
    send take that many seconds (a slow broker).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.sent: list[OutboundMessage] = []
        self.failures = 0
        self.accept_before_failing = 0
        self.gate: asyncio.Event | None = None
        self.delay = 0.0
        self.calls = 0

    async def send(self, messages: Sequence[OutboundMessage]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures > 0:
            self.failures -= 1
            accepted = list(messages[: self.accept_before_failing])
            if accepted:
                await super().send(accepted)
                self.sent.extend(accepted)
            raise RuntimeError("the broker is down")  # untranslated: the Bus wraps it
        await super().send(messages)
        self.sent.extend(messages)

    def sent_ids(self) -> list[str]:
        return [message.id for message in self.sent]


@pytest.fixture
def name() -> str:
    return f"relay-{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture
async def store(name: str) -> AsyncIterator[MemoryEventStore]:
    store = MemoryEventStore(name, outbox=True)
    yield store
    await store.close()


@pytest_asyncio.fixture
async def transport(name: str) -> RecordingTransport:
    return RecordingTransport(name)


@pytest_asyncio.fixture
async def bus(transport: RecordingTransport) -> AsyncIterator[Bus]:
    bus = Bus(transport)
    yield bus
    await bus.close()


def _event(n: int, stream: str) -> Event:
    return Event(type="relay.test", source="tester", key=stream, payload={"n": n})


async def _append(store: MemoryEventStore, count: int, streams: int = 3) -> list[RecordedEvent]:
    recorded: list[RecordedEvent] = []
    for n in range(count):
        stream = f"s{n % streams}"
        recorded += await store.append(stream, [_event(n, stream)])
    return recorded


def _ids(recorded: list[RecordedEvent]) -> list[str]:
    return [str(r.event.id) for r in recorded]


async def _drain(relay: OutboxRelay) -> int:
    total = 0
    while count := await relay.run_once():
        total += count
    return total


@pytest.mark.asyncio
async def test_publishes_in_position_order_then_empties_the_outbox(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport
) -> None:
    recorded = await _append(store, 50)
    received = Collector()
    await bus.subscribe("relay.>", received, group="readers", start="earliest")
    relay = OutboxRelay(store, bus, batch_size=7)
    assert await _drain(relay) == 50
    assert transport.sent_ids() == _ids(recorded)
    assert transport.calls == 8, "one publish_many per batch"
    assert await store.read_outbox(100) == []
    assert relay.published == 50
    await wait_for(lambda: len(received.events) == 50, what="50 deliveries")
    for stream in ("s0", "s1", "s2"):
        own = [e.id for e in received.events if e.key == stream]
        assert own == [r.event.id for r in recorded if r.stream_id == stream]


@pytest.mark.asyncio
async def test_run_follows_appends_and_stop_finishes_and_releases(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport, name: str
) -> None:
    relay = OutboxRelay(store, bus, batch_size=10)
    task = asyncio.create_task(relay.run())
    recorded = await _append(store, 5)
    await wait_for(lambda: len(transport.sent) == 5, what="5 events published")
    recorded += await _append(store, 5)
    await wait_for(lambda: len(transport.sent) == 10, what="10 events published")
    assert relay.active
    relay.stop()
    async with asyncio.timeout(5):
        await task
    assert not relay.active
    assert transport.sent_ids() == _ids(recorded)
    # Released: another relay takes over at once, not after the lease time.
    other = await store.acquire_relay_lease("default", "someone-else", 10)
    assert other is not None


@pytest.mark.asyncio
async def test_one_relay_active_and_a_standby_takes_over_when_its_lease_expires(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport, name: str
) -> None:
    first = OutboxRelay(store, bus, batch_size=4, lease_ttl=0.3, owner="first")
    standby = OutboxRelay(MemoryEventStore(name, outbox=True), bus, batch_size=4,
                          lease_ttl=0.3, owner="standby")
    recorded = await _append(store, 6)
    assert await first.run_once() == 4
    assert await standby.run_once() == 0
    assert first.active
    assert not standby.active
    # The first relay dies here (no release); its lease runs out.
    await asyncio.sleep(0.35)
    assert await standby.run_once() == 2
    assert standby.lease is not None
    assert first.lease is not None
    assert standby.lease.fence == first.lease.fence + 1
    assert transport.sent_ids() == _ids(recorded)


@pytest.mark.asyncio
async def test_the_fence_stops_a_relay_that_stalled_past_its_lease(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport, name: str
) -> None:
    recorded = await _append(store, 6)
    stalled = OutboxRelay(store, bus, batch_size=3, lease_ttl=0.2, owner="stalled")
    gate = transport.gate = asyncio.Event()
    step = asyncio.create_task(stalled.run_once())  # reads 3 events, then hangs in publish
    await asyncio.sleep(0.3)  # ... past its lease
    transport.gate = None
    successor = OutboxRelay(MemoryEventStore(name, outbox=True), bus, batch_size=10,
                            owner="successor")
    assert await successor.run_once() == 6
    gate.set()
    with pytest.raises(LeaseLostError):
        await step  # published its (now duplicate) batch, but may not mark anything
    assert not stalled.active
    assert await stalled.run_once() == 0  # standby now
    # The successor's copies came first; the stalled relay's late ones are duplicates.
    assert transport.sent_ids() == _ids(recorded) + _ids(recorded[:3])
    assert await store.read_outbox(10) == []


@pytest.mark.asyncio
async def test_a_failed_publish_is_retried_and_nothing_is_lost(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorded = await _append(store, 20)
    transport.failures = 2
    transport.accept_before_failing = 3  # each failed batch got 3 events through
    relay = OutboxRelay(store, bus, batch_size=8, retry_backoff=0.01)
    task = asyncio.create_task(relay.run())
    try:
        with caplog.at_level(logging.ERROR, logger="agentevents.relay"):
            await wait_for(lambda: len(set(transport.sent_ids())) == 20, what="every event")
    finally:
        relay.stop()
        await task
    sent = transport.sent_ids()
    # At least once: the 3 accepted events of each failed attempt went again.
    assert len(sent) == 20 + 2 * 3
    assert sorted(set(sent)) == sorted(_ids(recorded))
    firsts = list(dict.fromkeys(sent))
    assert firsts == _ids(recorded), "first copies are in position order"
    assert "the broker is down" in caplog.text
    assert "retrying" in caplog.text
    assert await store.read_outbox(100) == []


@pytest.mark.asyncio
async def test_run_once_raises_what_failed_and_keeps_the_batch(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport
) -> None:
    from agentevents.core.errors import PublishError

    recorded = await _append(store, 3)
    transport.failures = 1
    relay = OutboxRelay(store, bus)
    with pytest.raises(PublishError, match="broker is down"):
        await relay.run_once()
    assert await store.read_outbox(10) == recorded
    assert await relay.run_once() == 3


@pytest.mark.asyncio
async def test_a_relay_needs_a_store_with_the_outbox_on(name: str, bus: Bus) -> None:
    plain = MemoryEventStore(name)
    with pytest.raises(OutboxNotEnabledError, match=r"outbox=true"):
        OutboxRelay(plain, bus)
    with pytest.raises(ConfigurationError, match="no transactional outbox"):
        OutboxRelay(_NoOutbox(), bus)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="batch_size"):
        OutboxRelay(MemoryEventStore(name, outbox=True), bus, batch_size=0)


class _NoOutbox:
    """Not a store with an outbox."""

    def __repr__(self) -> str:
        return "NoOutbox()"


@pytest.mark.asyncio
async def test_run_ends_when_the_store_is_closed(store: MemoryEventStore, bus: Bus) -> None:
    relay = OutboxRelay(store, bus)
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.05)
    await store.close()
    async with asyncio.timeout(5):
        with pytest.raises(StoreClosedError):
            await task


def test_memory_store_url_takes_the_outbox_option() -> None:
    assert MemoryEventStore.from_url("memory://?outbox=true").outbox_enabled
    assert MemoryEventStore.from_url("memory://x?outbox=off").outbox_enabled is False
    assert not MemoryEventStore.from_url("memory://").outbox_enabled
    with pytest.raises(ConfigurationError, match="outbox"):
        MemoryEventStore.from_url("memory://?outbox=perhaps")


def test_cli_relay_refuses_a_store_without_the_outbox(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["relay", "--store", f"sqlite+aiosqlite:///{tmp_path / 'e.db'}",
              "--bus", "memory://"],
    )
    assert result.exit_code == 2
    assert "?outbox=true" in result.output.replace("\n", " ")


def test_cli_relay_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'e.db'}?outbox=true"
    process = subprocess.Popen(
        [sys.executable, "-m", "agentevents.cli", "relay", "--store", store_url,
         "--bus", "memory://u:s3cret@cli-test", "--name", "cli"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = ""
        assert process.stdout is not None
        while "is active" not in output:
            line = process.stdout.readline()
            assert line, f"the relay exited early: {output}"
            output += line
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    output += rest
    assert process.returncode == 0, output
    assert "released the outbox lease" in output
    assert "relay stopped: published 0 event(s)" in output
    assert "s3cret" not in output
