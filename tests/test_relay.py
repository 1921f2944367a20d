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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
from typer.testing import CliRunner

from agentevents.backends.memory import MemoryTransport
from agentevents.cli import app
from agentevents.conformance_tests.helpers import Collector, wait_for
from agentevents.core.bus import Bus
from agentevents.core.errors import (
    BackendConnectionError,
    ConfigurationError,
    LeaseLostError,
    OutboxNotEnabledError,
    RelayNameError,
    StoreClosedError,
)
from agentevents.core.event import Event
from agentevents.core.store import RecordedEvent
from agentevents.core.transport import OutboundMessage
from agentevents.relay import MAX_NAME_LENGTH, MAX_OWNER_LENGTH, OutboxRelay
from agentevents.stores.memory import MemoryEventStore
from agentevents.stores.sql.schema import LEASE_NAME_LENGTH, LEASE_OWNER_LENGTH


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
    # A long lease: its heartbeat does not run during the test, as in a process that stalled.
    stalled = OutboxRelay(store, bus, batch_size=3, lease_ttl=30, owner="stalled")
    gate = transport.gate = asyncio.Event()
    step = asyncio.create_task(stalled.run_once())  # reads 3 events, then hangs in publish
    await wait_for(lambda: transport.calls == 1, what="the publish to start")
    # ... and its lease ends behind its back (it expired while the whole process stalled).
    assert stalled.lease is not None
    await store.release_relay_lease(stalled.lease)
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


async def _relay_all(relays: list[OutboxRelay], done: Callable[[], bool], what: str) -> None:
    """Run ``relays`` until ``done()``, then stop them and wait for them to finish."""
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        await wait_for(done, 10, what=what)
        await asyncio.sleep(0.5)  # time for a late duplicate or a takeover to show
    finally:
        for relay in relays:
            relay.stop()
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks)


@pytest.mark.asyncio
async def test_a_publish_slower_than_the_lease_keeps_it_and_nothing_is_published_twice(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport, name: str
) -> None:
    """The active relay renews its lease while the bus publishes: a slow broker (failover,
    throttling) does not let a standby take over mid-publish and publish the batch again,
    back and forth (a duplicate storm)."""
    recorded = await _append(store, 5)
    # Every publish outlasts the 0.6 s lease (renewed every 0.2 s: a standby could take
    # it only after a stall of 0.4 s).
    transport.delay = 0.8
    relays = [OutboxRelay(MemoryEventStore(name, outbox=True), bus, batch_size=2,
                          lease_ttl=0.6, owner=f"relay-{n}") for n in range(2)]
    await _relay_all(relays, lambda: sum(relay.published for relay in relays) >= 5,
                     "every event published and marked")
    assert transport.sent_ids() == _ids(recorded), "every event once, in order"
    assert sorted(relay.published for relay in relays) == [0, 5], "one relay did it all"
    assert await store.read_outbox(10) == []


@pytest.mark.asyncio
async def test_the_lease_is_renewed_while_a_failing_publish_backs_off(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport, name: str
) -> None:
    """A retry backoff longer than the lease does not hand the lease to a standby."""
    recorded = await _append(store, 5)
    transport.failures = 2
    active = OutboxRelay(store, bus, lease_ttl=0.6, retry_backoff=1.0, max_backoff=1.0,
                         owner="active")
    other_transport = RecordingTransport(f"{name}-other")
    other_bus = Bus(other_transport)
    standby = OutboxRelay(MemoryEventStore(name, outbox=True), other_bus, lease_ttl=0.6,
                          owner="standby")
    first = asyncio.create_task(active.run())
    try:
        await wait_for(lambda: transport.calls >= 1, what="the first (failing) publish")
        await _relay_all([standby], lambda: active.published >= 5,
                         "the active relay's retry to succeed")
    finally:
        active.stop()
        async with asyncio.timeout(5):
            await first
        await other_bus.close()
    assert transport.calls == 3
    assert transport.sent_ids() == _ids(recorded)
    assert other_transport.sent == []
    assert standby.published == 0


@pytest.mark.asyncio
async def test_a_relay_that_loses_its_lease_mid_publish_abandons_the_batch(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport
) -> None:
    recorded = await _append(store, 4)
    relay = OutboxRelay(store, bus, lease_ttl=0.3, owner="loser")
    gate = transport.gate = asyncio.Event()  # the broker hangs
    step = asyncio.create_task(relay.run_once())
    try:
        await wait_for(lambda: transport.calls == 1, what="the publish to start")
        # Another relay takes the lease over (as if it had expired).
        assert relay.lease is not None
        await store.release_relay_lease(relay.lease)
        assert await store.acquire_relay_lease(relay.name, "taker", 30) is not None
        async with asyncio.timeout(2):  # noticed at the next renewal, lease_ttl / 3 later
            with pytest.raises(LeaseLostError):
                await step
    finally:
        gate.set()
    assert not relay.active
    assert transport.sent == [], "the hanging publish was cancelled"
    assert await store.read_outbox(10) == recorded, "nothing was marked published"


@pytest.mark.asyncio
async def test_a_lease_that_cannot_be_renewed_abandons_the_batch_before_it_expires(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    recorded = await _append(store, 4)
    relay = OutboxRelay(store, bus, lease_ttl=0.3, owner="cut-off")
    gate = transport.gate = asyncio.Event()  # the broker hangs
    step = asyncio.create_task(relay.run_once())
    try:
        await wait_for(lambda: transport.calls == 1, what="the publish to start")

        async def unreachable(*args: object) -> None:
            raise BackendConnectionError("the store is unreachable")

        monkeypatch.setattr(store, "acquire_relay_lease", unreachable)
        async with asyncio.timeout(2):
            with (caplog.at_level(logging.WARNING, logger="agentevents.relay"),
                  pytest.raises(LeaseLostError)):
                await step
    finally:
        gate.set()
    assert "the store is unreachable" in caplog.text
    assert not relay.active
    assert transport.sent == []
    assert await store.read_outbox(10) == recorded


@pytest.mark.asyncio
async def test_relays_of_one_outbox_share_one_name(
    store: MemoryEventStore, bus: Bus, transport: RecordingTransport, name: str
) -> None:
    """Relays named differently (someone feeding two buses) would each remove what the
    other published: the second name is refused, so the first bus gets every event."""
    recorded = await _append(store, 20)
    other_transport = RecordingTransport(f"{name}-other")
    other_bus = Bus(other_transport)
    first = OutboxRelay(store, bus, name="to-a", batch_size=3)
    second = OutboxRelay(MemoryEventStore(name, outbox=True), other_bus, name="to-b",
                         batch_size=3)
    try:
        assert await first.run_once() == 3
        with pytest.raises(RelayNameError, match="same name") as info:
            await second.run_once()
        assert isinstance(info.value, ConfigurationError)
        assert (info.value.name, info.value.existing) == ("to-b", "to-a")
        async with asyncio.timeout(5):
            with pytest.raises(RelayNameError):
                await second.run()  # a configuration error ends run(): not retried
        await _relay_all([first], lambda: first.published >= 20, "every event published")
        # Refused even with no relay of the old name left (its lease released).
        with pytest.raises(RelayNameError):
            await second.run_once()
    finally:
        await other_bus.close()
    assert transport.sent_ids() == _ids(recorded)
    assert other_transport.sent == []


def test_cli_relay_refuses_a_second_name(tmp_path: Path) -> None:
    from agentevents.stores.sql.store import SqlEventStore

    store_url = f"sqlite+aiosqlite:///{tmp_path / 'e.db'}?outbox=true"

    async def take_lease() -> None:
        store = SqlEventStore(store_url)
        try:
            lease = await store.acquire_relay_lease("first", "someone", 10)
            assert lease is not None
            await store.release_relay_lease(lease)
        finally:
            await store.close()

    asyncio.run(take_lease())
    result = CliRunner().invoke(
        app, ["relay", "--store", store_url, "--bus", "memory://", "--name", "second"]
    )
    assert result.exit_code == 2, result.output
    output = result.output.replace("\n", " ")
    assert "relayed under the name 'first'" in output
    assert "relay_lease" in output


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
@pytest.mark.parametrize(("options", "limit"), [
    ({"name": "n" * (MAX_NAME_LENGTH + 1)}, f"1 to {MAX_NAME_LENGTH} characters"),
    ({"name": ""}, f"1 to {MAX_NAME_LENGTH} characters"),
    ({"owner": "o" * (MAX_OWNER_LENGTH + 1)}, f"1 to {MAX_OWNER_LENGTH} characters"),
])  # fmt: skip
async def test_name_and_owner_lengths_are_checked_when_the_relay_is_made(
    store: MemoryEventStore, bus: Bus, options: dict[str, str], limit: str
) -> None:
    """Before any store call (the memory store itself has no limit): an error saying it."""
    with pytest.raises(ConfigurationError, match=limit):
        OutboxRelay(store, bus, **options)  # type: ignore[arg-type]
    longest = OutboxRelay(store, bus, name="n" * MAX_NAME_LENGTH, owner="o" * MAX_OWNER_LENGTH)
    assert len(OutboxRelay(store, bus, name="n" * MAX_NAME_LENGTH).owner) <= MAX_OWNER_LENGTH
    assert await longest.run_once() == 0


def test_the_relay_limits_are_what_the_sql_lease_table_holds() -> None:
    assert (MAX_NAME_LENGTH, MAX_OWNER_LENGTH) == (LEASE_NAME_LENGTH, LEASE_OWNER_LENGTH)


@pytest.mark.asyncio
async def test_the_outbox_belongs_to_the_named_log(name: str, bus: Bus,
                                                   transport: RecordingTransport) -> None:
    """Store objects of a named log opened without the option record their appends once
    one of them turned the outbox on: a writer cannot bypass the relay."""
    relay_store = MemoryEventStore(name, outbox=True)
    writer = MemoryEventStore.from_url(f"memory://{name}")
    assert writer.outbox_enabled
    recorded = await writer.append("s", [_event(1, "s")])
    assert await _drain(OutboxRelay(relay_store, bus)) == 1
    assert transport.sent_ids() == _ids(recorded)


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


def test_cli_relay_checks_the_name_before_connecting(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    result = CliRunner().invoke(
        app, ["relay", "--store", f"sqlite+aiosqlite:///{path}?outbox=true",
              "--bus", "memory://", "--name", "n" * (MAX_NAME_LENGTH + 1)],
    )
    assert result.exit_code == 2, result.output
    assert f"must be 1 to {MAX_NAME_LENGTH} characters long" in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    assert not path.exists(), "nothing was opened"


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
