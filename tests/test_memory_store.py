"""What the in-memory store promises beyond the shared suite: private and named logs."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

import pytest

from agentevents import ConfigurationError, Event, create_store
from agentevents.plugins import registry
from agentevents.stores import memory, sql
from agentevents.stores.memory import MemoryEventStore

for name, plugin in (("memory_store", memory), ("sql", sql)):  # for a source checkout
    with contextlib.suppress(ValueError):  # already registered (entry point, other module)
        registry.register(plugin, name=name)


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.mark.asyncio
async def test_plain_urls_are_private_and_named_urls_shared() -> None:
    name = _name()
    private_a, private_b = create_store("memory://"), create_store("memory://")
    named_a, named_b = create_store(f"memory://{name}"), create_store(f"memory://{name}")
    assert isinstance(named_a, MemoryEventStore)
    await private_a.append("s", [Event(type="a")])
    assert await private_b.stream_version("s") is None
    await named_a.append("s", [Event(type="a")])
    assert await named_b.stream_version("s") == 1
    assert repr(named_a) == f"MemoryEventStore('memory://{name}')"
    await named_a.close()  # closing one object leaves the named log to the others
    assert await named_b.stream_version("s") == 1
    await named_b.close()
    assert await create_store(f"memory://{name}").stream_version("s") == 1


@pytest.mark.asyncio
async def test_appends_wake_followers_of_the_same_named_log() -> None:
    name = _name()
    writer, follower = MemoryEventStore(name), MemoryEventStore(name)
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(follower.wait_for_append(0, 30))
    await asyncio.sleep(0.01)
    started = loop.time()
    await writer.append("s", [Event(type="a")])
    await asyncio.wait_for(waiter, 5)
    assert loop.time() - started < 5


def test_a_named_log_outlives_event_loops_and_threads() -> None:
    """asyncio primitives bind to one loop; the named log must work from any loop."""
    name = _name()

    async def wait_then_append(n: int) -> int:
        store = MemoryEventStore(name)
        head = await store.head_position()
        waiter = asyncio.create_task(store.wait_for_append(head, 30))
        await asyncio.sleep(0.01)
        await store.append(f"s{n}", [Event(type="a")])
        await asyncio.wait_for(waiter, 5)
        return await store.head_position()

    assert asyncio.run(wait_then_append(1)) == 1
    assert asyncio.run(wait_then_append(2)) == 2
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(asyncio.run(wait_then_append(3))))
    thread.start()
    thread.join(10)
    assert results == [3]


@pytest.mark.parametrize(
    "url", ["memory:///x", "memory://x?size=1", "memoryx://", "memory://u:s3cret@x"]
)
def test_bad_memory_urls(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        MemoryEventStore.from_url(url)
    assert "s3cret" not in str(info.value)
