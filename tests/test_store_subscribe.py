"""The core's catch-up subscription polls with backoff while idle (stores without an append
signal from other processes rely on it): short waits at first, doubling up to
``idle_timeout``, back to the first wait as soon as events arrive."""

from __future__ import annotations

from contextlib import aclosing

import pytest

from agentevents.core.event import Event
from agentevents.core.store import RecordedEvent
from agentevents.stores.memory import MemoryEventStore


class _WaitRecorder(MemoryEventStore):
    """A memory store whose ``wait_for_append`` records its timeout and returns at once;
    after ``idle_rounds`` waits it appends one event (as another process would)."""

    def __init__(self, idle_rounds: list[int]) -> None:
        super().__init__()
        self.waits: list[float] = []
        self._appends_after = idle_rounds

    async def wait_for_append(self, after_position: int, timeout: float) -> None:
        self.waits.append(timeout)
        if self._appends_after and len(self.waits) == self._appends_after[0]:
            self._appends_after.pop(0)
            await self.append("s", [Event(type="a.b", source="x")])


@pytest.mark.asyncio
async def test_idle_waits_double_up_to_idle_timeout_and_reset_on_events() -> None:
    store = _WaitRecorder(idle_rounds=[7, 9])
    got: list[RecordedEvent] = []
    async with aclosing(store.subscribe(0, idle_timeout=1.0, initial_wait=0.02)) as events:
        async for recorded in events:
            got.append(recorded)
            if len(got) == 2:
                break
    assert [round(w, 3) for w in store.waits] == [
        0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0,  # idle: doubling, capped; then an event
        0.02,  # the batch that brought it was short: wait briefly, re-read
        0.02,  # nothing new: start over from the first wait (and the second event comes)
    ]


@pytest.mark.asyncio
async def test_full_batches_are_read_without_waiting() -> None:
    store = _WaitRecorder(idle_rounds=[])
    for _ in range(5):
        await store.append("s", [Event(type="a.b", source="x")])
    got: list[RecordedEvent] = []
    async with aclosing(store.subscribe(0, batch_size=2, idle_timeout=1.0)) as events:
        async for recorded in events:
            got.append(recorded)
            if len(got) == 5:
                break
    assert store.waits == []
    with pytest.raises(ValueError, match="batch_size"):
        await anext(aiter(store.subscribe(0, batch_size=0)))
