"""pytest plugin of the conformance suite: ``--bus-url`` / ``--store-url`` and fixtures.

Run the whole suite against a backend::

    pytest --pyargs agentevents.conformance_tests --bus-url redis://127.0.0.1:6379
    pytest --pyargs agentevents.conformance_tests --store-url postgresql+asyncpg://...

With only ``--bus-url`` the store tests are deselected, and the other way round. A
backend's own test module can instead import the test classes and override the
``bus_url`` / ``store_url`` fixtures (see ``agentevents/conformance_tests/__init__.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

try:  # the suite needs pytest-asyncio (agentevents[test]); the options must load without it
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised only in installs without the test extra
    pytest_asyncio = None  # type: ignore[assignment]

#: Async fixtures need pytest-asyncio; without it they are plain (unusable) fixtures and the
#: suite's tests fail with pytest-asyncio's own "async def functions are not natively
#: supported" message, while the rest of the user's pytest run is unaffected.
async_fixture = pytest_asyncio.fixture if pytest_asyncio is not None else pytest.fixture

if TYPE_CHECKING:
    from agentevents.core.bus import Bus
    from agentevents.core.store import EventStore

BusFactory = Callable[[], Awaitable["Bus"]]
StoreFactory = Callable[[], Awaitable["EventStore"]]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("agentevents", "agentevents conformance suite")
    group.addoption("--bus-url", default=None, help="bus URL to run the bus conformance tests on")
    group.addoption(
        "--store-url", default=None, help="store URL to run the store conformance tests on"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bus_conformance: a test of the shipped bus suite")
    config.addinivalue_line("markers", "store_conformance: a test of the shipped store suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the suite half whose URL was not given, when the suite runs via --pyargs."""
    bus_url = config.getoption("--bus-url")
    store_url = config.getoption("--store-url")
    if bus_url is None and store_url is None:
        return  # test modules provide their own url fixtures
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        unwanted_bus = item.get_closest_marker("bus_conformance") and bus_url is None
        unwanted_store = item.get_closest_marker("store_conformance") and store_url is None
        (drop if unwanted_bus or unwanted_store else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def bus_url(request: pytest.FixtureRequest) -> str:
    """The bus URL under test (``--bus-url``); override this fixture in a test module."""
    url: str | None = request.config.getoption("--bus-url")
    if url is None:
        pytest.fail("no bus URL: pass --bus-url URL, or override the bus_url fixture")
    return url


@pytest.fixture(scope="session")
def store_url(request: pytest.FixtureRequest) -> str:
    """The store URL under test (``--store-url``); override this fixture in a test module."""
    url: str | None = request.config.getoption("--store-url")
    if url is None:
        pytest.fail("no store URL: pass --store-url URL, or override the store_url fixture")
    return url


@pytest.fixture
def unique() -> str:
    """A short name unique to this test: prefix every event type, group and stream with it."""
    return "t" + uuid.uuid4().hex[:12]


@async_fixture
async def bus_factory(bus_url: str) -> AsyncIterator[BusFactory]:
    """Opens independent buses on ``bus_url`` (members, processes); closes them after."""
    from agentevents.plugins.registry import create_bus

    opened: list[Bus] = []

    async def make() -> Bus:
        bus = create_bus(bus_url)
        opened.append(bus)
        return bus

    yield make
    for bus in reversed(opened):
        await bus.close(timeout=5.0)


@async_fixture
async def bus(bus_factory: BusFactory) -> Bus:
    """One bus on ``bus_url``."""
    return await bus_factory()


@async_fixture
async def store_factory(store_url: str) -> AsyncIterator[StoreFactory]:
    """Opens independent stores on ``store_url`` (concurrent writers); closes them after."""
    from agentevents.plugins.registry import create_store

    opened: list[EventStore] = []

    async def make() -> EventStore:
        store = create_store(store_url)
        opened.append(store)
        return store

    yield make
    for store in reversed(opened):
        await store.close()


@async_fixture
async def store(store_factory: StoreFactory) -> EventStore:
    """One store on ``store_url``."""
    return await store_factory()
