"""The outbox conformance suite: what a store implementing
:class:`~agentevents.core.outbox.Outbox` promises the relay.

Runs with the store suite (``--store-url``, or ``from ... import *`` and a ``store_url``
fixture). The store under test with its outbox turned on comes from ``outbox_store_url``,
which by default adds ``outbox=true`` to the URL's query; override that fixture if your
store turns its outbox on differently. Stores that do not implement ``Outbox`` skip these
tests, saying so.

The outbox belongs to the storage, not to a store object: once it is on, appends through
*every* store object of that storage are recorded, including one opened without the
option (``store_url``'s), or a writer that forgot it would bypass the relay. Where turning
it on is an explicit step of the storage (the SQL store: a setting of its tables), the
store offers ``enable_outbox()``, and the suite calls it on the storage under test, as an
operator would before starting a relay: **this enables the outbox of the tables under
test for good** (appends to them are recorded from then on), so point the suite at tables
of its own.

The tests share the store's outbox with whatever else uses it: they only look at the events
of their own streams, and mark them published when done. Do not run them against a store
whose outbox a live relay is draining: it would publish and remove the tests' events.

One outbox is relayed under one name, so every test takes the relay lease under the same
name, ``outbox_relay_name`` (``"default"``, the relay's default name), with owners of its
own, and releases its leases when done. Against an outbox that was relayed under another
name (the tests get :class:`~agentevents.core.errors.RelayNameError`), override that
fixture with that name, or use fresh tables.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest

from agentevents.conformance_tests.plugin import async_fixture
from agentevents.core.errors import (
    ConcurrencyError,
    ConfigurationError,
    DuplicateEventError,
    LeaseLostError,
    OutboxNotEnabledError,
    RelayNameError,
)
from agentevents.core.event import Event
from agentevents.core.outbox import Lease, Outbox
from agentevents.core.store import NO_STREAM, EventStore, RecordedEvent

pytestmark = [pytest.mark.store_conformance, pytest.mark.asyncio]

#: Enough to see every event a test wrote, past what earlier tests left behind.
READ_LIMIT = 100_000
TIMEOUT = 60.0

OutboxStore = Any  # an EventStore that is also an Outbox
OutboxStoreFactory = Callable[[], Awaitable[OutboxStore]]


def _event(unique: str, **fields: Any) -> Event:
    fields.setdefault("source", f"{unique}-agent")
    return Event(type=f"{unique}.happened", **fields)


def with_outbox(url: str) -> str:
    """``url`` with ``outbox=true`` in its query (replacing any ``outbox=`` there)."""
    base, _, query = url.partition("?")
    options = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "outbox"]
    return f"{base}?{urlencode([*options, ('outbox', 'true')])}"


@pytest.fixture(scope="session")
def outbox_store_url(store_url: str) -> str:
    """The store URL with the outbox turned on; override it if yours differs."""
    return with_outbox(store_url)


@async_fixture
async def outbox_store_factory(outbox_store_url: str) -> AsyncIterator[OutboxStoreFactory]:
    """Opens stores with the outbox on; skips the test if the store has no outbox."""
    from agentevents.plugins.registry import create_store

    opened: list[EventStore] = []

    async def make() -> OutboxStore:
        store = create_store(outbox_store_url)
        opened.append(store)
        if not isinstance(store, Outbox):
            pytest.skip(f"{type(store).__name__} does not implement "
                        "agentevents.core.outbox.Outbox (no transactional outbox)")
        enable = getattr(store, "enable_outbox", None)
        if enable is not None:  # an explicit switch of the storage (idempotent)
            await enable()
        return store

    yield make
    for store in reversed(opened):
        await store.close()


@async_fixture
async def outbox_store(outbox_store_factory: OutboxStoreFactory) -> OutboxStore:
    """One store with the outbox on."""
    return await outbox_store_factory()


@pytest.fixture(scope="session")
def outbox_relay_name() -> str:
    """The relay name (lease name) the tests use: the one name of the outbox under test."""
    return "default"


class Leases:
    """Takes the relay lease ``name`` for the tests, and releases every lease taken at the
    end of the test, so that the next test finds it free."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._taken: list[tuple[OutboxStore, Lease]] = []

    async def acquire(self, store: OutboxStore, owner: str, ttl: float) -> Lease | None:
        lease: Lease | None = await store.acquire_relay_lease(self.name, owner, ttl)
        if lease is not None:
            self._taken.append((store, lease))
        return lease

    async def release_all(self) -> None:
        for store, lease in reversed(self._taken):
            with contextlib.suppress(Exception):  # stale leases change nothing anyway
                await store.release_relay_lease(lease)


@async_fixture
async def leases(
    outbox_relay_name: str, outbox_store_factory: OutboxStoreFactory
) -> AsyncIterator[Leases]:
    """The tests' relay leases (released before their stores close)."""
    taken = Leases(outbox_relay_name)
    yield taken
    await taken.release_all()


async def _own_pending(store: OutboxStore, streams: set[str]) -> list[RecordedEvent]:
    pending: list[RecordedEvent] = await store.read_outbox(READ_LIMIT)
    positions = [r.position for r in pending]
    assert positions == sorted(positions), "read_outbox is not in position order"
    assert len(set(positions)) == len(positions), "read_outbox repeated a position"
    return [r for r in pending if r.stream_id in streams]


async def _publish_all(store: OutboxStore, leases: Leases, unique: str,
                       recorded: list[RecordedEvent]) -> None:
    """Mark ``recorded`` published (clean-up), under a lease of the test's own."""
    lease = await leases.acquire(store, f"{unique}-cleaner", 30)
    assert lease is not None, f"the relay lease {leases.name!r} is held by another relay"
    await store.mark_published(lease, [r.position for r in recorded])
    await store.release_relay_lease(lease)


class TestOutboxRecording:
    async def test_appends_are_recorded_in_position_order(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        streams = {f"{unique}-a", f"{unique}-b"}
        recorded: list[RecordedEvent] = []
        for n in range(6):
            stream = f"{unique}-a" if n % 2 else f"{unique}-b"
            recorded += await outbox_store.append(
                stream, [_event(unique, payload={"n": n}, key=stream) for _ in range(n % 3 + 1)]
            )
        assert outbox_store.outbox_enabled
        pending = await _own_pending(outbox_store, streams)
        assert pending == recorded
        await _publish_all(outbox_store, leases, unique, recorded)
        assert await _own_pending(outbox_store, streams) == []

    async def test_a_failed_append_records_nothing(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        stream = f"{unique}-s"
        first = _event(unique)
        recorded = await outbox_store.append(stream, [first], expected_version=NO_STREAM)
        with pytest.raises(ConcurrencyError):
            await outbox_store.append(stream, [_event(unique)], expected_version=NO_STREAM)
        with pytest.raises(DuplicateEventError):
            await outbox_store.append(stream, [_event(unique), first])
        with pytest.raises(DuplicateEventError):  # a new stream, refused whole
            await outbox_store.append(f"{unique}-new", [_event(unique), first])
        assert await outbox_store.stream_version(f"{unique}-new") is None
        assert await _own_pending(outbox_store, {stream}) == recorded
        assert await outbox_store.read_stream(stream) == recorded
        await _publish_all(outbox_store, leases, unique, recorded)

    async def test_concurrent_appends_are_all_recorded_once(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        streams = [f"{unique}-{n}" for n in range(8)]
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(*(
                outbox_store.append(stream, [_event(unique, key=stream) for _ in range(3)])
                for stream in streams for _ in range(3)
            ))
        recorded = sorted((r for batch in results for r in batch), key=lambda r: r.position)
        assert await _own_pending(outbox_store, set(streams)) == recorded
        await _publish_all(outbox_store, leases, unique, recorded)

    async def test_store_without_outbox_refuses_outbox_calls(self, store: EventStore,
                                                             unique: str) -> None:
        """A store opened without the option: outbox calls are refused unless its storage
        has the outbox on (another store object turned it on); either way consistently."""
        if not isinstance(store, Outbox):
            pytest.skip(f"{type(store).__name__} does not implement Outbox")
        refused: OutboxNotEnabledError | None = None
        try:
            await store.read_outbox(1)
        except OutboxNotEnabledError as exc:
            refused = exc
        if refused is None:
            assert store.outbox_enabled, "read_outbox worked, so the outbox is on"
            return
        assert "outbox=true" in str(refused), "the error should say how to turn it on"
        assert not store.outbox_enabled
        with pytest.raises(OutboxNotEnabledError):
            await store.acquire_relay_lease(unique, f"{unique}-owner", 10)

    async def test_appends_through_every_store_object_are_recorded(
        self, store: EventStore, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        """The outbox is the storage's: a store object opened without the option, on
        storage whose outbox is on, records its appends too (it cannot bypass the relay)."""
        probe = f"{unique}-probe"
        recorded = await outbox_store.append(probe, [_event(unique)])
        if await store.stream_version(probe) is None:
            pytest.skip("each store object opens a private database: nothing is shared")
        stream = f"{unique}-s"
        recorded += await store.append(stream, [_event(unique), _event(unique)])
        assert await _own_pending(outbox_store, {probe, stream}) == recorded
        if isinstance(store, Outbox):
            assert store.outbox_enabled
            assert await _own_pending(store, {probe, stream}) == recorded
        await _publish_all(outbox_store, leases, unique, recorded)


class TestRelayLease:
    async def test_one_holder_renewal_keeps_the_fence(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        a = await leases.acquire(outbox_store, f"{unique}-a", 30)
        assert isinstance(a, Lease)
        assert (a.name, a.owner) == (leases.name, f"{unique}-a")
        assert await leases.acquire(outbox_store, f"{unique}-b", 30) is None
        renewed = await leases.acquire(outbox_store, f"{unique}-a", 30)
        assert renewed is not None
        assert renewed.fence == a.fence
        assert renewed.expires_at >= a.expires_at

    async def test_one_outbox_is_relayed_under_one_name(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        a = await leases.acquire(outbox_store, f"{unique}-a", 30)
        assert a is not None
        other = f"{unique}-other"
        with pytest.raises(RelayNameError) as info:
            await outbox_store.acquire_relay_lease(other, f"{unique}-b", 30)
        assert isinstance(info.value, ConfigurationError)
        assert (info.value.name, info.value.existing) == (other, leases.name)
        await outbox_store.release_relay_lease(a)
        with pytest.raises(RelayNameError):  # not only while the lease is held
            await outbox_store.acquire_relay_lease(other, f"{unique}-b", 30)
        b = await leases.acquire(outbox_store, f"{unique}-b", 30)
        assert b is not None, "a refused name changes nothing"
        assert b.fence == a.fence + 1

    async def test_expired_lease_is_taken_over_with_a_new_fence(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        a = await leases.acquire(outbox_store, f"{unique}-a", 0.2)
        assert a is not None
        await asyncio.sleep(0.3)
        b = await leases.acquire(outbox_store, f"{unique}-b", 30)
        assert b is not None
        assert b.fence > a.fence
        assert await leases.acquire(outbox_store, f"{unique}-a", 30) is None

    async def test_release_lets_another_take_over_at_once(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        a = await leases.acquire(outbox_store, f"{unique}-a", 30)
        assert a is not None
        await outbox_store.release_relay_lease(a)
        b = await leases.acquire(outbox_store, f"{unique}-b", 30)
        assert b is not None
        assert b.fence > a.fence
        await outbox_store.release_relay_lease(a)  # stale: changes nothing
        assert await leases.acquire(outbox_store, f"{unique}-c", 30) is None

    async def test_the_fence_stops_a_relay_that_lost_its_lease(
        self, outbox_store: OutboxStore, leases: Leases, unique: str
    ) -> None:
        stream = f"{unique}-s"
        recorded = await outbox_store.append(stream, [_event(unique) for _ in range(4)])
        stale = await leases.acquire(outbox_store, f"{unique}-a", 0.2)
        assert stale is not None
        await asyncio.sleep(0.3)
        current = await leases.acquire(outbox_store, f"{unique}-b", 30)
        assert current is not None
        with pytest.raises(LeaseLostError):
            await outbox_store.mark_published(stale, [r.position for r in recorded])
        assert await _own_pending(outbox_store, {stream}) == recorded, "a stale lease deleted"
        await outbox_store.mark_published(current, [r.position for r in recorded[:2]])
        assert await _own_pending(outbox_store, {stream}) == recorded[2:]
        await outbox_store.mark_published(current, [r.position for r in recorded])  # again: ok
        assert await _own_pending(outbox_store, {stream}) == []

    async def test_a_lease_is_shared_by_store_objects(
        self, outbox_store_factory: OutboxStoreFactory, leases: Leases, unique: str
    ) -> None:
        one, two = await outbox_store_factory(), await outbox_store_factory()
        probe = f"{unique}-probe"
        recorded = await one.append(probe, [_event(unique)])
        if await two.stream_version(probe) is None:
            pytest.skip("each store object opens a private database: nothing is shared")
        assert await _own_pending(two, {probe}) == recorded
        a = await leases.acquire(one, f"{unique}-a", 30)
        assert a is not None
        assert await leases.acquire(two, f"{unique}-b", 30) is None
        with pytest.raises(RelayNameError):
            await two.acquire_relay_lease(f"{unique}-other", f"{unique}-b", 30)
        await one.release_relay_lease(a)
        b = await leases.acquire(two, f"{unique}-b", 30)
        assert b is not None
        await two.mark_published(b, [r.position for r in recorded])
        assert await _own_pending(one, {probe}) == []
