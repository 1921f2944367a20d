"""The event store interface: an append-only log of streams, the basis of event sourcing.

Every recorded event has a per-stream ``version`` (1, 2, 3, ... without gaps) and a global
``position`` (strictly increasing across all streams). Positions may skip numbers (a failed
transaction can burn one) but never *fill in later*: once a reader has seen position ``p``,
no event with a position below ``p`` is committed afterwards. Projections and catch-up
subscriptions depend on that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from agentevents.core.event import Event, utcnow

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Sequence
    from datetime import datetime

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "EventQuery",
    "EventStore",
    "ExpectedVersion",
    "RecordedEvent",
    "Snapshot",
    "check_expected_version",
]


class _Expectation:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The stream must not exist yet (no events).
NO_STREAM: Final = _Expectation("NO_STREAM")
#: No check: append whatever the stream's version is.
ANY: Final = _Expectation("ANY")
#: The stream must exist (have at least one event), at any version.
STREAM_EXISTS: Final = _Expectation("STREAM_EXISTS")

#: An int means "the stream's current version is exactly this" (its last event's version).
ExpectedVersion = int | _Expectation


def check_expected_version(stream_id: str, expected: ExpectedVersion, actual: int | None) -> None:
    """Raise :class:`ConcurrencyError` unless a stream at ``actual`` satisfies ``expected``.

    ``actual`` is the stream's current version, ``None`` when it has no events. Stores call
    this inside the transaction that appends, so the check and the write are atomic.
    """
    from agentevents.core.errors import ConcurrencyError

    if expected is ANY:
        return
    if expected is NO_STREAM:
        ok = actual is None
    elif expected is STREAM_EXISTS:
        ok = actual is not None
    elif isinstance(expected, int) and not isinstance(expected, bool):
        ok = actual == expected if expected > 0 else actual is None
    else:
        raise TypeError(f"expected_version must be an int, NO_STREAM, ANY or STREAM_EXISTS, "
                        f"not {expected!r}")
    if not ok:
        raise ConcurrencyError(stream_id, expected, actual)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored: where it is in its stream and in the global log."""

    event: Event
    stream_id: str
    #: 1-based version inside ``stream_id``.
    version: int
    #: Global position, strictly increasing in commit order.
    position: int
    #: When the store committed it (UTC).
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Filters for :meth:`EventStore.query`; all given filters must match (AND).

    Results are in global order, positions greater than ``after_position``, at most ``limit``.
    """

    types: Sequence[str] | None = None
    source: str | None = None
    correlation_id: str | None = None
    stream_id: str | None = None
    #: Event ``time`` at or after this instant.
    since: datetime | None = None
    #: Event ``time`` strictly before this instant.
    until: datetime | None = None
    after_position: int = 0
    limit: int | None = 1000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A stream's folded state as of ``version``, to skip replaying its history."""

    stream_id: str
    version: int
    state: dict[str, Any]
    time: datetime = field(default_factory=utcnow)


class EventStore(ABC):
    """Append-only event storage. Implementations translate driver errors at the edge."""

    @abstractmethod
    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        expected_version: ExpectedVersion = ANY,
    ) -> list[RecordedEvent]:
        """Append ``events`` to ``stream_id`` atomically: all or none.

        Raises :class:`~agentevents.core.errors.ConcurrencyError` when the stream's version
        does not satisfy ``expected_version`` (of two concurrent writers expecting the same
        version, exactly one wins), and :class:`~agentevents.core.errors.DuplicateEventError`
        when an event id is already stored (or repeated in the batch). Nothing is stored then.
        """

    @abstractmethod
    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Events of one stream with ``version >= from_version``, in version order."""

    @abstractmethod
    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Events of every stream with ``position > after_position``, in global order."""

    @abstractmethod
    async def query(self, query: EventQuery) -> list[RecordedEvent]:
        """Events matching ``query`` (type, source, correlation id, time range), in order."""

    @abstractmethod
    async def stream_version(self, stream_id: str) -> int | None:
        """The stream's current version, ``None`` if it has no events."""

    @abstractmethod
    async def head_position(self) -> int:
        """The highest committed global position, 0 for an empty store."""

    @abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``, replacing an older one of the same stream."""

    @abstractmethod
    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        """The latest snapshot of ``stream_id``, or ``None``."""

    @abstractmethod
    async def wait_for_append(self, after_position: int, timeout: float) -> None:
        """Return when events past ``after_position`` may exist, or after ``timeout`` s.

        A hint for followers: it may return early; callers re-read to find out.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release connections; further calls raise ``StoreClosedError``."""

    async def subscribe(
        self,
        after_position: int = 0,
        *,
        batch_size: int = 500,
        idle_timeout: float = 1.0,
        initial_wait: float = 0.02,
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Catch-up subscription: history after ``after_position``, then live events.

        Yields every event exactly once in global order, forever (break out, or cancel the
        task, to stop). Resume after a restart by passing the last position you processed.

        Once caught up it waits with :meth:`wait_for_append`, which returns early when the
        store learns of an append (at once for appends through this store object; on
        PostgreSQL also for other processes, through LISTEN/NOTIFY). Otherwise the store is
        polled with backoff: the first wait is ``initial_wait`` seconds, doubled after each
        read that found nothing, up to ``idle_timeout``; any event resets it. So a
        follower notices another process's append within about ``idle_timeout`` at worst,
        and quickly while the log is busy.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        first = max(min(initial_wait, idle_timeout), 0.0)
        wait = first
        position = after_position
        while True:
            batch = await self.read_all(position, batch_size)
            for recorded in batch:
                yield recorded
                position = recorded.position
            if batch:
                wait = first
                if len(batch) == batch_size:
                    continue  # more history: read on at once
            await self.wait_for_append(position, wait)
            if not batch:
                wait = min(max(wait * 2, 0.001), idle_timeout)

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

