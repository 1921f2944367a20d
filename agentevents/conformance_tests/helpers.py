"""Small tools the conformance tests share: a recording handler, polling waits, probes.

Everything here observes a bus from the outside, the way an application would. Waits poll a
condition until a deadline instead of sleeping a fixed time, so the suite is fast on the
in-memory backend and still patient with a real broker; only checks that something does
*not* happen need a fixed quiet period (:func:`stay_quiet`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agentevents.core.bus import current_delivery
from agentevents.core.event import Event

__all__ = [
    "DELIVERY_TIMEOUT",
    "QUIET_PERIOD",
    "Collector",
    "ConcurrencyProbe",
    "HandledCall",
    "HandlerFailure",
    "make_event",
    "poll",
    "stay_quiet",
    "wait_for",
]

T = TypeVar("T")

#: Longest a test waits for something that must happen (a delivery, a redelivery).
DELIVERY_TIMEOUT = 20.0
#: How long a test watches for something that must *not* happen (a duplicate, a stray event).
QUIET_PERIOD = 0.5


async def wait_for(
    predicate: Callable[[], bool],
    timeout: float = DELIVERY_TIMEOUT,
    *,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.01,
) -> None:
    """Poll ``predicate`` until it holds; fail the test (``AssertionError``) after ``timeout``.

    ``what`` describes the awaited state in the failure message; a callable is evaluated only
    on failure, so it can show what was observed instead.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {described}")
        await asyncio.sleep(interval)


async def poll(
    fetch: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    timeout: float = DELIVERY_TIMEOUT,
    *,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Call ``fetch`` until its result satisfies ``until``; return that result.

    Fails the test (``AssertionError``, showing the last result) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await fetch()
        if until(result):
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f} s waiting for {what}; last saw {result!r}"
            )
        await asyncio.sleep(interval)


async def stay_quiet(seconds: float = QUIET_PERIOD) -> None:
    """Give a wrong delivery (duplicate, stray, late) the time to show up."""
    await asyncio.sleep(seconds)


def make_event(prefix: str, name: str, **fields: Any) -> Event:
    """An event of type ``<prefix>.<name>`` (``prefix`` is the test's ``unique`` name)."""
    return Event(type=f"{prefix}.{name}", **fields)


@dataclass(frozen=True, slots=True)
class HandledCall:
    """One call of a :class:`Collector`: the event and the delivery facts of the call."""

    event: Event
    attempt: int
    group: str | None
    pattern: str
    at: float


@dataclass(eq=False)
class Collector:
    """A handler that records every call; optionally slow, failing, or reporting its calls.

    ``fail`` decides, per call, whether the handler raises (``fail(event, attempt)``);
    ``delay`` is awaited before returning (seconds, or a function of the event).
    Every call is recorded, failed ones included; :attr:`events` lists the successful ones.
    """

    name: str = "collector"
    delay: float | Callable[[Event], float] = 0.0
    fail: Callable[[Event, int], bool] | None = None
    calls: list[HandledCall] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    on_call: Callable[[Event], None] | None = None

    async def __call__(self, event: Event) -> None:
        delivery = current_delivery()
        self.calls.append(
            HandledCall(event, delivery.attempt, delivery.group, delivery.pattern,
                        time.monotonic())
        )
        if self.on_call is not None:
            self.on_call(event)
        delay = self.delay(event) if callable(self.delay) else self.delay
        if delay > 0:
            await asyncio.sleep(delay)
        if self.fail is not None and self.fail(event, delivery.attempt):
            raise HandlerFailure(f"{self.name}: planned failure of {event.id} "
                                 f"on attempt {delivery.attempt}")
        self.events.append(event)

    @property
    def ids(self) -> list[str]:
        """Ids of successfully handled events, in handling order (duplicates kept)."""
        return [str(event.id) for event in self.events]

    def attempts_of(self, event: Event) -> list[int]:
        """Attempt numbers of every call made for ``event``, in call order."""
        return [call.attempt for call in self.calls if call.event.id == event.id]

    def has(self, events: Iterable[Event]) -> bool:
        """Whether every one of ``events`` was handled successfully at least once."""
        seen = {event.id for event in self.events}
        return all(event.id in seen for event in events)

    async def wait_for_events(
        self, events: Iterable[Event], timeout: float = DELIVERY_TIMEOUT
    ) -> None:
        """Wait until every one of ``events`` was handled; fail the test with what is missing."""
        wanted = list(events)

        def missing() -> str:
            seen = {event.id for event in self.events}
            absent = [f"{e.type}/{e.id}" for e in wanted if e.id not in seen]
            return (f"{self.name} to handle {len(wanted)} event(s); still missing "
                    f"{len(absent)}: {absent[:5]}{' ...' if len(absent) > 5 else ''}")

        await wait_for(lambda: self.has(wanted), timeout, what=missing)

    async def wait_for_count(self, count: int, timeout: float = DELIVERY_TIMEOUT) -> None:
        """Wait until at least ``count`` events were handled successfully."""
        await wait_for(
            lambda: len(self.events) >= count,
            timeout,
            what=lambda: f"{self.name} to handle {count} event(s); got {len(self.events)}",
        )


class HandlerFailure(Exception):
    """The exception a :class:`Collector` raises when told to fail."""


@dataclass(eq=False)
class ConcurrencyProbe:
    """Counts handler calls running at once; :attr:`peak` is the most ever observed."""

    running: int = 0
    peak: int = 0
    running_keys: dict[str, int] = field(default_factory=dict)
    #: Keys seen running twice at once (must stay empty when order per key is kept).
    overlapping_keys: set[str] = field(default_factory=set)

    def enter(self, key: str | None = None) -> None:
        """A handler call started."""
        self.running += 1
        self.peak = max(self.peak, self.running)
        if key is not None:
            now = self.running_keys.get(key, 0) + 1
            self.running_keys[key] = now
            if now > 1:
                self.overlapping_keys.add(key)

    def leave(self, key: str | None = None) -> None:
        """A handler call ended (returned or raised)."""
        self.running -= 1
        if key is not None:
            self.running_keys[key] -= 1
