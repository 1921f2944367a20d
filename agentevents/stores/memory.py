"""The in-memory reference event store: ``memory://`` and ``memory://name``.

It passes the whole store conformance suite and is the model the other stores follow.

* ``memory://`` builds a fresh, private store on every :func:`create_store` call.
* ``memory://name`` shares one named log with every store of that name in this process
  (the way ``memory://name`` shares a bus), so two components can append and follow the
  same history. A named log lives as long as the process.
* ``?outbox=true`` (or ``outbox=True``) turns the transactional outbox on
  (:class:`~agentevents.core.outbox.Outbox`) for the log: from then on each append to it
  records its events for the relay under the same lock as the append itself. The outbox,
  the switch and the relay leases belong to the log, so every store object of a named log
  records its appends once one of them turned it on, whatever its own URL says (like the
  SQL store, whose outbox is a setting of its tables).

Nothing survives the process. Positions are 1, 2, 3, ... without gaps: an append runs
to completion under one lock (check the expected version, assign versions and positions,
record) and never awaits in between, so appends are totally ordered and a reader can never
see position ``p`` before every position below ``p`` is recorded: there are no holes.

The lock is a :class:`threading.Lock`, held only for that synchronous section, rather than
an :class:`asyncio.Lock`: a named log outlives event loops (tests, repeated
``asyncio.run``), and asyncio primitives bind to the first loop that waits on them.
For the same reason followers blocked in :meth:`MemoryEventStore.wait_for_append` are
woken through one future per waiter, on that waiter's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from agentevents.core.errors import (
    ConfigurationError,
    DuplicateEventError,
    LeaseLostError,
    OutboxNotEnabledError,
    RelayNameError,
    StoreClosedError,
)
from agentevents.core.event import Event, utcnow
from agentevents.core.outbox import Lease
from agentevents.core.store import (
    ANY,
    EventQuery,
    EventStore,
    ExpectedVersion,
    RecordedEvent,
    Snapshot,
    check_expected_version,
)
from agentevents.core.urls import redact_url
from agentevents.plugins.hookspecs import BackendInfo, hookimpl
from agentevents.stores._common import (
    aware_utc,
    check_batch,
    from_micros,
    json_dumps,
    json_loads,
    url_flag,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from uuid import UUID

__all__ = ["MemoryEventStore", "agentevents_store_backends"]


class _Log:
    """The state of one in-memory store; several store objects may share a named one."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        #: Every recorded event; ``events[p - 1]`` is at position ``p``.
        self.events: list[RecordedEvent] = []
        #: Each stream's events; ``streams[s][v - 1]`` is version ``v``.
        self.streams: dict[str, list[RecordedEvent]] = {}
        self.ids: set[UUID] = set()
        #: The latest snapshot per stream; its state is copied in and out.
        self.snapshots: dict[str, Snapshot] = {}
        self.waiters: set[asyncio.Future[None]] = set()
        #: Whether appends record their events for publication (set once, never unset).
        self.outbox_on = False
        #: Positions recorded for publication and not yet marked published, in order.
        self.outbox: dict[int, None] = {}
        #: The relay lease by name: one at most (an outbox is relayed under one name).
        self.leases: dict[str, _LeaseRow] = {}

    def wake(self) -> None:
        """Resolve every waiter's future, each on its own event loop."""
        with self.mutex:
            waiters, self.waiters = self.waiters, set()
        for future in waiters:
            loop = future.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is running:
                _resolve(future)
            else:
                # RuntimeError: that loop is closed, so nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(slots=True)
class _LeaseRow:
    owner: str
    fence: int
    expires_us: int


def _now_us() -> int:
    return time.time_ns() // 1000


_named_logs: dict[str, _Log] = {}
_named_lock = threading.Lock()


def _log_named(name: str) -> _Log:
    with _named_lock:
        return _named_logs.setdefault(name, _Log())


class MemoryEventStore(EventStore):
    """An event store in this process's memory.

    ``MemoryEventStore()`` is private to its owner; ``MemoryEventStore(name="x")`` (or
    ``create_store("memory://x")``) shares the log named ``x`` within the process.
    Closing a store object does not erase a named log; other objects keep using it.
    ``outbox=True`` turns the outbox on for the log: every append's events are recorded for
    the outbox relay, through every store object of the log.
    """

    def __init__(self, name: str | None = None, *, outbox: bool = False) -> None:
        self._name = name
        self._log = _log_named(name) if name else _Log()
        self._outbox = outbox
        if outbox:
            self._log.outbox_on = True
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> MemoryEventStore:
        """``memory://`` (a private store) or ``memory://name`` (a shared, named one),
        optionally with ``?outbox=true``."""
        parts = urlsplit(url)
        shown = redact_url(url)
        if (parts.scheme.lower() != "memory" or parts.path.strip("/")
                or "@" in parts.netloc):
            raise ConfigurationError(
                f"{shown!r} is not a memory store URL: use 'memory://' or "
                "'memory://name', optionally with '?outbox=true'"
            )
        outbox = False
        for option, value in parse_qsl(parts.query, keep_blank_values=True):
            if option != "outbox":
                raise ConfigurationError(
                    f"{shown!r}: unknown memory store option {option!r}; the only one is "
                    "'outbox' (true/false)"
                )
            outbox = url_flag(value, option, shown)
        return cls(name=parts.netloc or None, outbox=outbox)

    def __repr__(self) -> str:
        query = "?outbox=true" if self._outbox else ""
        return f"MemoryEventStore('memory://{self._name or ''}{query}')"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self!r} is closed; create a new store")

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        expected_version: ExpectedVersion = ANY,
    ) -> list[RecordedEvent]:
        """Append atomically; an empty batch only checks ``expected_version``."""
        self._check_open()
        check_batch(events)
        # Copy payloads through JSON: the store keeps what the SQL store would keep, and a
        # caller changing its dicts afterwards cannot change history.
        copies = [
            event.model_copy(
                update={
                    "payload": json_loads(json_dumps(event.payload, f"payload of {event.id}")),
                    "metadata": dict(event.metadata),
                }
            )
            for event in events
        ]
        log = self._log
        with log.mutex:
            stream = log.streams.get(stream_id, [])
            check_expected_version(stream_id, expected_version, len(stream) or None)
            stored = [str(e.id) for e in copies if e.id in log.ids]
            if stored:
                raise DuplicateEventError(stored)
            if not copies:
                return []
            now = utcnow()
            recorded = [
                RecordedEvent(
                    event=event,
                    stream_id=stream_id,
                    version=len(stream) + i,
                    position=len(log.events) + i,
                    recorded_at=now,
                )
                for i, event in enumerate(copies, start=1)
            ]
            log.events.extend(recorded)
            log.streams.setdefault(stream_id, []).extend(recorded)
            log.ids.update(e.id for e in copies)
            if log.outbox_on:
                log.outbox.update(dict.fromkeys(r.position for r in recorded))
        log.wake()
        return recorded

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        self._check_open()
        start = max(from_version, 1) - 1
        with self._log.mutex:
            stream = self._log.streams.get(stream_id, [])
            found = stream[start : None if limit is None else start + max(limit, 0)]
        return _detached(found)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self._check_open()
        start = max(after_position, 0)
        with self._log.mutex:
            found = self._log.events[start : start + max(limit, 0)]
        return _detached(found)

    async def query(self, query: EventQuery) -> list[RecordedEvent]:
        self._check_open()
        types = None if query.types is None else frozenset(query.types)
        since = None if query.since is None else aware_utc(query.since, "query.since")
        until = None if query.until is None else aware_utc(query.until, "query.until")
        with self._log.mutex:
            candidates = (
                self._log.streams.get(query.stream_id, [])
                if query.stream_id is not None
                else self._log.events
            )
            found: list[RecordedEvent] = []
            for recorded in candidates:
                event = recorded.event
                if (
                    recorded.position <= query.after_position
                    or (types is not None and event.type not in types)
                    or (query.source is not None and event.source != query.source)
                    or (
                        query.correlation_id is not None
                        and event.correlation_id != query.correlation_id
                    )
                    or (since is not None and event.time < since)
                    or (until is not None and event.time >= until)
                ):
                    continue
                if query.limit is not None and len(found) >= query.limit:
                    break
                found.append(recorded)
        return _detached(found)

    async def stream_version(self, stream_id: str) -> int | None:
        self._check_open()
        with self._log.mutex:
            return len(self._log.streams.get(stream_id, [])) or None

    async def head_position(self) -> int:
        self._check_open()
        with self._log.mutex:
            return len(self._log.events)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        state = json_loads(json_dumps(snapshot.state, f"snapshot state of {snapshot.stream_id!r}"))
        time = aware_utc(snapshot.time, "snapshot time")
        with self._log.mutex:
            self._log.snapshots[snapshot.stream_id] = replace(snapshot, state=state, time=time)

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        self._check_open()
        with self._log.mutex:
            snapshot = self._log.snapshots.get(stream_id)
        if snapshot is None:
            return None
        return replace(snapshot, state=json_loads(json_dumps(snapshot.state, "snapshot state")))

    async def wait_for_append(self, after_position: int, timeout: float) -> None:
        self._check_open()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        log = self._log
        with log.mutex:
            if len(log.events) > after_position:
                return
            log.waiters.add(future)
        try:
            await asyncio.wait([future], timeout=max(timeout, 0))
        finally:
            with log.mutex:
                log.waiters.discard(future)

    async def close(self) -> None:
        """Stop this store object (idempotent); a named log stays for other objects."""
        if not self._closed:
            self._closed = True
            self._log.wake()

    # -- the outbox (agentevents.core.outbox.Outbox) -------------------------------------

    @property
    def outbox_enabled(self) -> bool:
        """Whether appends through this store object record their events in the outbox:
        whether the log has the outbox on."""
        return self._log.outbox_on

    def _check_outbox(self) -> None:
        self._check_open()
        if not self._log.outbox_on:
            raise OutboxNotEnabledError(repr(self))

    async def acquire_relay_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        self._check_outbox()
        now = _now_us()
        expires = now + max(int(ttl * 1_000_000), 1)
        with self._log.mutex:
            for existing in self._log.leases:
                if existing != name:  # one outbox, one relay name (there is one lease at most)
                    raise RelayNameError(
                        repr(self), name, existing,
                        "a memory store's lease lasts as long as its process: restart it",
                    )
            row = self._log.leases.get(name)
            if row is None:
                row = self._log.leases[name] = _LeaseRow(owner, 1, expires)
            elif row.owner == owner:
                row.expires_us = expires
            elif row.expires_us <= now:
                row.owner, row.fence, row.expires_us = owner, row.fence + 1, expires
            else:
                return None
            return Lease(name=name, owner=owner, fence=row.fence,
                         expires_at=from_micros(expires))

    async def release_relay_lease(self, lease: Lease) -> None:
        self._check_outbox()
        with self._log.mutex:
            row = self._log.leases.get(lease.name)
            if row is not None and (row.owner, row.fence) == (lease.owner, lease.fence):
                row.expires_us = 0

    async def read_outbox(self, limit: int) -> list[RecordedEvent]:
        self._check_outbox()
        with self._log.mutex:
            found = [self._log.events[p - 1] for p in itertools.islice(
                self._log.outbox, max(limit, 0))]
        return _detached(found)

    async def mark_published(self, lease: Lease, positions: Sequence[int]) -> None:
        self._check_outbox()
        with self._log.mutex:
            row = self._log.leases.get(lease.name)
            if row is None or (row.owner, row.fence) != (lease.owner, lease.fence):
                raise LeaseLostError(lease.name, lease.owner, lease.fence)
            for position in positions:
                self._log.outbox.pop(position, None)


def _create(url: str) -> MemoryEventStore:
    return MemoryEventStore.from_url(url)


@hookimpl
def agentevents_store_backends() -> list[BackendInfo]:
    """The in-memory store, for ``memory://`` and ``memory://name``."""
    return [
        BackendInfo(
            name="memory-store",
            kind="store",
            schemes=("memory",),
            factory=_create,
            description="in-process event store (reference implementation, not durable)",
        )
    ]


def _detached(records: list[RecordedEvent]) -> list[RecordedEvent]:
    """Copies whose payload and metadata dicts a reader may change without changing history."""
    return [
        replace(r, event=r.event.model_copy(update={
            "payload": json_loads(json_dumps(r.event.payload, "payload")),
            "metadata": dict(r.event.metadata),
        }))
        for r in records
    ]
