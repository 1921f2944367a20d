"""The store conformance suite: what every :class:`~agentevents.core.store.EventStore` does.

Run it against a store URL::

    pytest --pyargs agentevents.conformance_tests --store-url sqlite+aiosqlite:///events.db

or from a backend's own tests, overriding the ``store_url`` fixture::

    from agentevents.conformance_tests.test_store import *  # noqa: F403

    @pytest.fixture(scope="session")
    def store_url() -> str:
        return "mystore://..."

The tests use only the public interface and the ``store``, ``store_factory`` and ``unique``
fixtures. Every stream, type, source and correlation id they write starts with the test's
``unique`` name, and reads of the global log start at the head noted before the test
wrote, keeping only the test's own streams: the suite can run against a store that holds
other events, and several runs can share it.

Decided behaviour that the contract leaves open, and these tests pin down:

* ``append(stream, [])`` stores nothing and returns ``[]``; it still checks
  ``expected_version`` (a wrong one raises :class:`ConcurrencyError`).
* An ``int`` expected version ``0`` means "no stream yet", like ``NO_STREAM``.
* An event id repeated inside one batch raises :class:`DuplicateEventError`, like an id
  that is already stored.
* Payloads go through JSON: what comes back equals what went in for JSON values, and a
  payload that is not JSON raises :class:`EventValidationError` with nothing stored.
* The store keeps its own copy: changing a payload dict after ``append``, or a loaded
  snapshot's state, changes nothing stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from agentevents.conformance_tests.plugin import StoreFactory
from agentevents.core.errors import (
    ConcurrencyError,
    DuplicateEventError,
    EventValidationError,
    StoreClosedError,
)
from agentevents.core.event import Event
from agentevents.core.store import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    EventQuery,
    EventStore,
    ExpectedVersion,
    RecordedEvent,
    Snapshot,
)

pytestmark = [pytest.mark.store_conformance, pytest.mark.asyncio]

#: Upper bound, in seconds, on any test that waits for concurrent work or live events.
TIMEOUT = 60.0


def _event(unique: str, name: str = "happened", **fields: Any) -> Event:
    """An event whose type is ``{unique}.{name}``; ``fields`` override the rest."""
    fields.setdefault("source", f"{unique}-agent")
    return Event(type=f"{unique}.{name}", **fields)


async def _read_own(store: EventStore, after: int, streams: set[str],
                    limit: int = 1000) -> list[RecordedEvent]:
    """Every event of ``streams`` after position ``after``, paging with ``limit``.

    Reads up to the head noted first, so other writers of a shared store cannot keep it busy.
    """
    own: list[RecordedEvent] = []
    position = after
    end = await store.head_position()
    while position < end:
        batch = await store.read_all(position, limit)
        if not batch:
            break
        assert len(batch) <= limit
        for recorded in batch:
            assert recorded.position > position, "read_all is not in strictly increasing order"
            position = recorded.position
            if recorded.stream_id in streams:
                own.append(recorded)
    return own


def _outcomes(results: list[Any]) -> list[str]:
    """Short descriptions of ``gather(..., return_exceptions=True)`` results."""
    return [f"{type(r).__name__}: {r}" if isinstance(r, BaseException) else "appended"
            for r in results]


def _subscription(store: EventStore, after: int,
                  **options: Any) -> aclosing[AsyncGenerator[RecordedEvent, None]]:
    """``store.subscribe(...)``, closed on exit."""
    return aclosing(store.subscribe(after, **options))


class TestAppendAndRead:
    async def test_round_trip_preserves_every_field(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-order"
        first = Event(
            type=f"{unique}.order.placed",
            version=3,
            time=datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC),
            source=f"{unique}-planner",
            correlation_id=f"{unique}-workflow",
            causation_id=f"{unique}-cause",
            key="customer-42",
            payload={
                "int": 7, "big": 2**53 + 1, "neg": -1, "float": 0.1, "true": True,
                "false": False, "none": None, "text": "a \"quoted\" \\ line\nbreak",
                "list": [1, "two", [3.5, {"four": 4}]], "nested": {"a": {"b": {"c": []}}},
                "empty": {},
            },
            metadata={"traceparent": "00-abc-def-01", "tenant": "acme"},
        )  # fmt: skip
        # An aware time in another zone is the same instant; it comes back in UTC.
        plus_0530 = timezone(timedelta(hours=5, minutes=30))
        second = Event(type=f"{unique}.order.paid",
                       time=datetime(2024, 3, 1, 5, 30, 0, 1, tzinfo=plus_0530))

        recorded = await store.append(stream, [first, second], expected_version=NO_STREAM)

        assert [r.event for r in recorded] == [first, second]
        assert [r.stream_id for r in recorded] == [stream, stream]
        assert [r.version for r in recorded] == [1, 2]
        assert recorded[0].position < recorded[1].position
        for r in recorded:
            assert r.recorded_at.utcoffset() == timedelta(0)
        read = await store.read_stream(stream)
        assert read == recorded
        back = read[0].event
        assert back.id == first.id
        assert back.payload == first.payload
        assert back.metadata == first.metadata
        assert back.time == datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
        assert back.time.utcoffset() == timedelta(0)
        assert back.time.microsecond == 123456
        assert read[1].event.time == datetime(2024, 3, 1, 0, 0, 0, 1, tzinfo=UTC)
        assert read[1].event.time.utcoffset() == timedelta(0)
        assert read[1].event.correlation_id is None
        assert read[1].event.key is None
        assert read[1].event.metadata == {}

    async def test_read_stream_from_version_and_limit(self, store: EventStore,
                                                      unique: str) -> None:
        stream = f"{unique}-s"
        events = [_event(unique, payload={"n": n}) for n in range(1, 6)]
        await store.append(stream, events)

        assert [r.version for r in await store.read_stream(stream, 3)] == [3, 4, 5]
        assert [r.version for r in await store.read_stream(stream, 2, limit=2)] == [2, 3]
        assert [r.event.payload["n"] for r in await store.read_stream(stream)] == [1, 2, 3, 4, 5]
        assert await store.read_stream(stream, 6) == []
        assert await store.read_stream(f"{unique}-missing") == []

    async def test_stream_version_follows_appends(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        assert await store.stream_version(stream) is None
        await store.append(stream, [_event(unique)])
        assert await store.stream_version(stream) == 1
        await store.append(stream, [_event(unique), _event(unique)])
        assert await store.stream_version(stream) == 3
        assert await store.stream_version(f"{unique}-other") is None

    async def test_head_position_covers_appended_events(self, store: EventStore,
                                                        unique: str) -> None:
        before = await store.head_position()
        assert before >= 0
        recorded = await store.append(f"{unique}-s", [_event(unique), _event(unique)])
        assert recorded[0].position > before
        assert await store.head_position() >= recorded[-1].position

    async def test_streams_are_independent(self, store: EventStore, unique: str) -> None:
        a = await store.append(f"{unique}-a", [_event(unique, "a")])
        b = await store.append(f"{unique}-b", [_event(unique, "b"), _event(unique, "b")])
        assert a[0].version == 1
        assert [r.version for r in b] == [1, 2]
        assert [r.event.type for r in await store.read_stream(f"{unique}-a")] == [f"{unique}.a"]


class TestExpectedVersion:
    async def _assert_refused(self, store: EventStore, stream: str,
                              expected: ExpectedVersion, unique: str) -> None:
        before = await store.read_stream(stream)
        rejected = _event(unique, "rejected")
        with pytest.raises(ConcurrencyError) as info:
            await store.append(stream, [rejected], expected_version=expected)
        assert info.value.stream_id == stream
        assert info.value.actual == (before[-1].version if before else None)
        assert await store.read_stream(stream) == before
        assert await store.query(EventQuery(types=[f"{unique}.rejected"])) == []

    async def test_no_stream(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        recorded = await store.append(stream, [_event(unique)], expected_version=NO_STREAM)
        assert recorded[0].version == 1
        await self._assert_refused(store, stream, NO_STREAM, unique)

    async def test_exact_version(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        await store.append(stream, [_event(unique), _event(unique)])
        recorded = await store.append(stream, [_event(unique)], expected_version=2)
        assert recorded[0].version == 3
        for stale in (0, 1, 2, 4, 99):
            await self._assert_refused(store, stream, stale, unique)
        assert (await store.append(stream, [_event(unique)], expected_version=3))[0].version == 4

    async def test_exact_version_on_missing_stream(self, store: EventStore, unique: str) -> None:
        await self._assert_refused(store, f"{unique}-s", 1, unique)
        recorded = await store.append(f"{unique}-s", [_event(unique)], expected_version=0)
        assert recorded[0].version == 1

    async def test_any(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        assert (await store.append(stream, [_event(unique)], expected_version=ANY))[0].version == 1
        assert (await store.append(stream, [_event(unique)]))[0].version == 2  # the default

    async def test_stream_exists(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        await self._assert_refused(store, stream, STREAM_EXISTS, unique)
        await store.append(stream, [_event(unique)])
        recorded = await store.append(stream, [_event(unique)], expected_version=STREAM_EXISTS)
        assert recorded[0].version == 2

    @pytest.mark.parametrize("expected", ["no_stream", "version"])
    async def test_concurrent_writers_exactly_one_wins(self, store: EventStore, unique: str,
                                                       expected: str) -> None:
        stream = f"{unique}-s"
        version: ExpectedVersion = NO_STREAM
        if expected == "version":
            await store.append(stream, [_event(unique)])
            version = 1
        before = await store.read_stream(stream)
        batches = [[_event(unique, payload={"writer": w}), _event(unique, payload={"writer": w})]
                   for w in range(20)]

        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                *(store.append(stream, batch, expected_version=version) for batch in batches),
                return_exceptions=True,
            )

        winners = [r for r in results if isinstance(r, list)]
        losers = [r for r in results if isinstance(r, ConcurrencyError)]
        assert len(winners) == 1, _outcomes(results)
        assert len(losers) == 19, _outcomes(results)
        after = await store.read_stream(stream)
        assert after == before + winners[0]
        assert [r.version for r in after] == list(range(1, len(before) + 3))
        assert len({r.event.payload["writer"] for r in winners[0]}) == 1

    async def test_concurrent_any_appends_all_land_whole(self, store: EventStore,
                                                         unique: str) -> None:
        stream = f"{unique}-s"
        batches = [[_event(unique, payload={"writer": w, "i": i}) for i in range(3)]
                   for w in range(20)]
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(*(store.append(stream, b) for b in batches))

        stored = await store.read_stream(stream)
        assert [r.version for r in stored] == list(range(1, 61))
        assert sorted(r.position for r in stored) == [r.position for r in stored]
        for batch, recorded in zip(batches, results, strict=True):
            assert [r.event.id for r in recorded] == [e.id for e in batch]
            versions = [r.version for r in recorded]
            assert versions == list(range(versions[0], versions[0] + 3)), "a batch was split"

    async def test_separate_store_objects_arbitrate_through_the_database(
        self, store_factory: StoreFactory, unique: str
    ) -> None:
        """Writers in different store objects (processes, pools) cannot both win either."""
        stores = [await store_factory() for _ in range(4)]
        probe = f"{unique}-probe"
        await stores[0].append(probe, [_event(unique)])
        if await stores[1].stream_version(probe) is None:
            pytest.skip("each store object opens a private database (e.g. SQLite :memory:, "
                        "unnamed memory://): there is no shared state to arbitrate")
        stream = f"{unique}-s"
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                *(s.append(stream, [_event(unique, payload={"writer": w})],
                           expected_version=NO_STREAM)
                  for w, s in enumerate(stores * 3)),
                return_exceptions=True,
            )
        winners = [r for r in results if isinstance(r, list)]
        assert len(winners) == 1, _outcomes(results)
        assert all(isinstance(r, ConcurrencyError) for r in results if r not in winners), (
            _outcomes(results))
        any_stream = f"{unique}-any"
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(s.append(any_stream, [_event(unique, payload={"w": w})])
                                   for w, s in enumerate(stores * 5)))
        stored = await stores[0].read_stream(any_stream)
        assert [r.version for r in stored] == list(range(1, 21)), "an ANY append was lost"


class TestDuplicates:
    async def test_id_repeated_in_batch_stores_nothing(self, store: EventStore,
                                                       unique: str) -> None:
        stream = f"{unique}-s"
        twice = _event(unique)
        with pytest.raises(DuplicateEventError) as info:
            await store.append(stream, [_event(unique), twice, twice])
        assert str(twice.id) in info.value.event_ids
        assert await store.stream_version(stream) is None
        assert await store.query(EventQuery(types=[f"{unique}.happened"])) == []

    async def test_stored_id_stores_nothing(self, store: EventStore, unique: str) -> None:
        original = _event(unique, "original")
        await store.append(f"{unique}-a", [original])
        fresh = _event(unique, "fresh")

        for stream, expected in ((f"{unique}-a", ANY), (f"{unique}-a", 1),
                                 (f"{unique}-b", NO_STREAM), (f"{unique}-b", ANY)):
            with pytest.raises(DuplicateEventError) as info:
                await store.append(stream, [fresh, original], expected_version=expected)
            assert info.value.event_ids == [str(original.id)]

        assert [r.event.id for r in await store.read_stream(f"{unique}-a")] == [original.id]
        assert await store.stream_version(f"{unique}-b") is None
        assert await store.query(EventQuery(types=[f"{unique}.fresh"])) == []
        # The store is still usable, and the fresh event alone is welcome.
        recorded = await store.append(f"{unique}-b", [fresh], expected_version=NO_STREAM)
        assert recorded[0].version == 1

    async def test_concurrent_duplicates_store_one(self, store: EventStore, unique: str) -> None:
        same = _event(unique)
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(
                *(store.append(f"{unique}-{n}", [same]) for n in range(10)),
                return_exceptions=True,
            )
        assert sum(isinstance(r, list) for r in results) == 1, _outcomes(results)
        assert sum(isinstance(r, DuplicateEventError) for r in results) == 9, _outcomes(results)
        assert len(await store.query(EventQuery(types=[same.type]))) == 1


class TestGlobalOrder:
    async def test_read_all_in_append_order_with_paging(self, store: EventStore,
                                                        unique: str) -> None:
        head = await store.head_position()
        streams = [f"{unique}-{n}" for n in range(3)]
        appended: list[RecordedEvent] = []
        for round_ in range(4):
            for stream in streams:
                appended += await store.append(
                    stream, [_event(unique, payload={"round": round_}) for _ in range(2)]
                )

        for limit in (1, 5, 1000):
            own = await _read_own(store, head, set(streams), limit=limit)
            assert own == appended

        positions = [r.position for r in appended]
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)
        middle = appended[11].position
        assert await _read_own(store, middle, set(streams)) == appended[12:]

    async def test_read_all_limit(self, store: EventStore, unique: str) -> None:
        head = await store.head_position()
        await store.append(f"{unique}-s", [_event(unique) for _ in range(5)])
        assert len(await store.read_all(head, limit=2)) == 2
        assert await store.read_all(head, limit=0) == []

    async def test_no_holes_under_concurrent_writers(self, store: EventStore,
                                                     unique: str) -> None:
        """Tailing readers see every event once, in order; none appears behind them later.

        A hole shows only if a reader happens to read between two commits, so several
        readers with different page sizes sample the log while the writers run.
        """
        writers, per_writer = 10, 30
        head = await store.head_position()
        streams = {f"{unique}-w{w}" for w in range(writers)}
        expected_ids: set[Any] = set()
        done = asyncio.Event()

        async def write(w: int) -> None:
            stream = f"{unique}-w{w}"
            version = 0
            while version < per_writer:
                size = 1 + (version % 3 == 0)  # batches of 1 and 2
                batch = [_event(unique, payload={"w": w}) for _ in range(size)]
                expected_ids.update(e.id for e in batch)
                await store.append(stream, batch, expected_version=version)
                version += size
                await asyncio.sleep(0)

        async def tail(limit: int) -> list[RecordedEvent]:
            seen: list[RecordedEvent] = []
            position = head
            while True:
                # Once the writers are done, every event of theirs is at or below the head.
                end = await store.head_position() if done.is_set() else None
                batch = await store.read_all(position, limit=limit)
                for recorded in batch:
                    assert recorded.position > position
                    position = recorded.position
                    if recorded.stream_id in streams:
                        seen.append(recorded)
                if end is not None and (not batch or position >= end):
                    return seen
                if not batch:
                    await store.wait_for_append(position, 0.05)

        async with asyncio.timeout(TIMEOUT):
            readers = [asyncio.create_task(tail(limit)) for limit in (1, 7, 100)]
            await asyncio.gather(*(write(w) for w in range(writers)))
            done.set()
            views = await asyncio.gather(*readers)

        final = await _read_own(store, head, streams)
        assert {r.event.id for r in final} == expected_ids
        for seen in views:
            ids = [r.event.id for r in seen]
            assert len(ids) == len(set(ids)), "a reader saw an event twice"
            missed = len(expected_ids - set(ids))
            assert not missed, f"{missed} events were committed behind a reader (holes filled)"
            assert seen == final
        for stream in streams:
            assert [r.version for r in await store.read_stream(stream)] == list(
                range(1, per_writer + 1)
            )


class TestQuery:
    async def test_by_type_source_correlation_and_stream(self, store: EventStore,
                                                         unique: str) -> None:
        planner, coder = f"{unique}-planner", f"{unique}-coder"
        flow = f"{unique}-flow"
        a = await store.append(f"{unique}-1", [
            _event(unique, "task.created", source=planner, correlation_id=flow),
            _event(unique, "task.started", source=coder, correlation_id=flow),
        ])
        b = await store.append(f"{unique}-2", [
            _event(unique, "task.created", source=coder),
            _event(unique, "task.failed", source=coder, correlation_id=flow),
        ])  # fmt: skip

        def q(**kw: Any) -> Any:
            return store.query(EventQuery(**kw))

        created, failed = f"{unique}.task.created", f"{unique}.task.failed"
        assert await q(types=[created]) == [a[0], b[0]]
        assert await q(types=[created, failed]) == [a[0], b[0], b[1]]
        assert await q(types=[]) == []
        assert await q(source=coder) == [a[1], b[0], b[1]]
        assert await q(source=planner) == [a[0]]
        assert await q(correlation_id=flow) == [a[0], a[1], b[1]]
        assert await q(stream_id=f"{unique}-2") == b
        assert await q(types=[created], source=coder) == [b[0]]  # filters combine (AND)
        assert await q(correlation_id=flow, stream_id=f"{unique}-1", source=coder) == [a[1]]
        assert await q(types=[f"{unique}.nothing"]) == []

    async def test_time_range_since_inclusive_until_exclusive(self, store: EventStore,
                                                              unique: str) -> None:
        t0 = datetime(2030, 1, 1, 12, 0, 0, 500000, tzinfo=UTC)
        times = [t0 + timedelta(microseconds=n) for n in (0, 1, 2, 3)] + [t0 - timedelta(days=1)]
        recorded = await store.append(
            f"{unique}-s", [_event(unique, time=t, payload={"n": n}) for n, t in enumerate(times)]
        )
        mine = [f"{unique}.happened"]

        def q(**kw: Any) -> Any:
            return store.query(EventQuery(types=mine, **kw))

        assert await q(since=times[1], until=times[3]) == recorded[1:3]
        assert await q(since=times[1]) == recorded[1:4]
        assert await q(until=times[1]) == [recorded[0], recorded[4]]
        assert await q(since=times[3], until=times[3]) == []
        # The same instant in another zone selects the same events.
        tokyo = timezone(timedelta(hours=9))
        assert await q(since=times[1].astimezone(tokyo), until=times[3].astimezone(tokyo)) == (
            recorded[1:3]
        )
        assert await store.query(EventQuery(source=f"{unique}-agent", since=times[2])) == (
            recorded[2:4]
        )

    async def test_after_position_and_limit(self, store: EventStore, unique: str) -> None:
        recorded = await store.append(f"{unique}-s", [_event(unique) for _ in range(5)])
        mine = [f"{unique}.happened"]
        assert await store.query(EventQuery(types=mine, limit=2)) == recorded[:2]
        assert await store.query(EventQuery(types=mine, limit=None)) == recorded
        after = recorded[1].position
        assert await store.query(EventQuery(types=mine, after_position=after)) == recorded[2:]
        assert await store.query(EventQuery(types=mine, after_position=after, limit=1)) == (
            recorded[2:3]
        )


class TestSnapshots:
    async def test_save_load_replace(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        assert await store.load_snapshot(stream) is None
        first = Snapshot(stream_id=stream, version=3,
                         state={"total": 12.5, "items": ["a", "b"], "name": "café ☕"},
                         time=datetime(2024, 6, 1, 8, 0, 0, 654321, tzinfo=UTC))
        await store.save_snapshot(first)
        assert await store.load_snapshot(stream) == first

        second = Snapshot(stream_id=stream, version=7, state={"total": 0, "nested": {"x": None}})
        await store.save_snapshot(second)
        loaded = await store.load_snapshot(stream)
        assert loaded == second
        assert loaded is not None
        assert loaded.time.utcoffset() == timedelta(0)
        assert await store.load_snapshot(f"{unique}-other") is None

    async def test_loaded_state_is_a_copy(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        state: dict[str, Any] = {"items": [1]}
        await store.save_snapshot(Snapshot(stream_id=stream, version=1, state=state))
        state["items"].append(2)
        loaded = await store.load_snapshot(stream)
        assert loaded is not None
        assert loaded.state == {"items": [1]}
        loaded.state["items"].append(3)
        again = await store.load_snapshot(stream)
        assert again is not None
        assert again.state == {"items": [1]}


class TestSubscribe:
    async def test_history_then_live(self, store: EventStore, unique: str) -> None:
        head = await store.head_position()
        stream = f"{unique}-s"
        history = await store.append(stream, [_event(unique, payload={"n": n}) for n in range(3)])
        got: list[RecordedEvent] = []
        caught_up = asyncio.Event()

        async def follow() -> None:
            async with _subscription(store, head, batch_size=2, idle_timeout=0.1) as events:
                async for recorded in events:
                    if recorded.stream_id != stream:
                        continue
                    got.append(recorded)
                    if len(got) == 3:
                        caught_up.set()
                    if len(got) == 6:
                        return

        async with asyncio.timeout(TIMEOUT):
            follower = asyncio.create_task(follow())
            await caught_up.wait()
            live: list[RecordedEvent] = []
            for n in range(3, 6):
                live += await store.append(stream, [_event(unique, payload={"n": n})])
                await asyncio.sleep(0.01)
            await follower

        assert got == history + live

    async def test_resume_after_position(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        recorded = await store.append(stream, [_event(unique) for _ in range(4)])
        got: list[RecordedEvent] = []
        async with asyncio.timeout(TIMEOUT):
            async with _subscription(store, recorded[1].position, idle_timeout=0.1) as sub:
                async for r in sub:
                    if r.stream_id == stream:
                        got.append(r)
                        if len(got) == 2:
                            break
        assert got == recorded[2:]

    async def test_restart_from_a_saved_position_then_follow_live(
        self, store: EventStore, store_factory: StoreFactory, unique: str
    ) -> None:
        """A follower that stopped resumes from the position it saved: the events it had
        not processed, then live ones, each once, even from a new store object."""
        stream = f"{unique}-s"
        head = await store.head_position()
        first = await store.append(stream, [_event(unique, payload={"n": n}) for n in range(5)])
        saved = head
        processed: list[RecordedEvent] = []
        async with asyncio.timeout(TIMEOUT):
            async with _subscription(store, saved, idle_timeout=0.1) as sub:
                async for r in sub:
                    if r.stream_id == stream:
                        processed.append(r)
                    saved = r.position  # saved after processing, as a projection would
                    if len(processed) == 2:
                        break
        assert processed == first[:2]

        restarted = await store_factory()
        if await restarted.stream_version(stream) is None:
            restarted = store  # a private database per store object: restart on the same one
        got: list[RecordedEvent] = []
        live: list[RecordedEvent] = []
        caught_up = asyncio.Event()

        async def follow() -> None:
            async with _subscription(restarted, saved, batch_size=2, idle_timeout=0.2) as sub:
                async for r in sub:
                    if r.stream_id != stream:
                        continue
                    got.append(r)
                    if len(got) == 3:
                        caught_up.set()
                    if len(got) == 5:
                        return

        async with asyncio.timeout(TIMEOUT):
            follower = asyncio.create_task(follow())
            await caught_up.wait()
            for n in range(5, 7):
                live += await store.append(stream, [_event(unique, payload={"n": n})])
            await follower
        assert got == first[2:] + live


class TestPayloads:
    async def test_unicode_everywhere(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-ström-流-🚀"
        text = "héllo wörld — 日本語 — עברית — emoji 🧪🚀 — e\u0301 — \u0000\u0007 — \U0010fffd"
        event = _event(
            unique,
            source=f"{unique}-agënt-代理",
            correlation_id=f"{unique}-关联",
            key="ключ",
            payload={text: text, "list": [text, "🎉"]},
            metadata={"note": text},
        )
        await store.append(stream, [event])
        (back,) = await store.read_stream(stream)
        assert back.stream_id == stream
        assert back.event == event
        assert await store.query(EventQuery(source=f"{unique}-agënt-代理")) == [back]
        assert await store.query(EventQuery(correlation_id=f"{unique}-关联")) == [back]
        # Exact comparison: a case-insensitive store would mix these up.
        assert await store.read_stream(stream.upper()) == []
        assert await store.query(EventQuery(source=f"{unique}-AGËNT-代理")) == []

    async def test_large_payload(self, store: EventStore, unique: str) -> None:
        blob = "0123456789abcdef" * 65536  # 1 MiB
        event = _event(unique, payload={"blob": blob, "numbers": list(range(10_000))})
        recorded = await store.append(f"{unique}-s", [event])
        (back,) = await store.read_stream(f"{unique}-s")
        assert back == recorded[0]
        assert back.event.payload["blob"] == blob
        assert back.event.payload["numbers"][-1] == 9_999

    async def test_payload_that_is_not_json_is_refused(self, store: EventStore,
                                                       unique: str) -> None:
        stream = f"{unique}-s"
        # Event refuses it already (pydantic's ValidationError); a store must not either way.
        with pytest.raises((EventValidationError, ValidationError)):
            await store.append(stream, [_event(unique), _event(unique, payload={"x": {1, 2}})])
        assert await store.stream_version(stream) is None

    async def test_stored_payload_is_not_the_callers_dict(self, store: EventStore,
                                                          unique: str) -> None:
        payload: dict[str, Any] = {"items": [1]}
        await store.append(f"{unique}-s", [_event(unique, payload=payload)])
        payload["items"].append(2)
        (back,) = await store.read_stream(f"{unique}-s")
        assert back.event.payload == {"items": [1]}


class TestEmptyBatch:
    async def test_empty_append_stores_nothing(self, store: EventStore, unique: str) -> None:
        stream = f"{unique}-s"
        assert await store.append(stream, []) == []
        assert await store.append(stream, [], expected_version=NO_STREAM) == []
        assert await store.stream_version(stream) is None
        await store.append(stream, [_event(unique)])
        assert await store.append(stream, [], expected_version=1) == []
        assert await store.stream_version(stream) == 1

    async def test_empty_append_checks_expected_version(self, store: EventStore,
                                                        unique: str) -> None:
        stream = f"{unique}-s"
        with pytest.raises(ConcurrencyError):
            await store.append(stream, [], expected_version=STREAM_EXISTS)
        await store.append(stream, [_event(unique)])
        with pytest.raises(ConcurrencyError):
            await store.append(stream, [], expected_version=NO_STREAM)
        with pytest.raises(ConcurrencyError):
            await store.append(stream, [], expected_version=5)


class TestLifecycle:
    async def test_closed_store_refuses_calls(self, store_factory: StoreFactory,
                                              unique: str) -> None:
        store = await store_factory()
        await store.append(f"{unique}-s", [_event(unique)])
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(StoreClosedError):
            await store.append(f"{unique}-s", [_event(unique)])
        with pytest.raises(StoreClosedError):
            await store.read_stream(f"{unique}-s")
        with pytest.raises(StoreClosedError):
            await store.read_all()

    async def test_async_with_closes(self, store_factory: StoreFactory, unique: str) -> None:
        async with await store_factory() as store:
            await store.append(f"{unique}-s", [_event(unique)])
        with pytest.raises(StoreClosedError):
            await store.head_position()

    async def test_wait_for_append_returns(self, store: EventStore, unique: str) -> None:
        head = await store.head_position()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            started = loop.time()
            await store.wait_for_append(head + 10**9, 0.05)  # nothing comes: the timeout ends it
            assert loop.time() - started < 10
            waiter = asyncio.create_task(store.wait_for_append(head, 1.0))
            await asyncio.sleep(0.01)
            await store.append(f"{unique}-s", [_event(unique)])
            await waiter  # a hint: it may come early, or at the timeout, but it comes
            await store.wait_for_append(head, 1.0)
