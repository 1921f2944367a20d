"""The shipped store suite on the real PostgreSQL and MariaDB servers of this machine.

Each session uses its own table prefix, creates the schema explicitly (servers never get it
implicitly), and drops its tables at the end. A server that cannot be reached skips loudly
on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from services import SQL_SERVERS, sql_server

from agentevents.conformance_tests.test_outbox import *  # noqa: F403
from agentevents.conformance_tests.test_store import *  # noqa: F403
from agentevents.stores.sql.store import SqlEventStore


async def _tables(url: str, create: bool) -> None:
    store = SqlEventStore(url)
    try:
        if create:
            await store.create_schema()
        else:
            await store.drop_schema()
    finally:
        await store.close()


@pytest.fixture(scope="session", params=sorted(SQL_SERVERS))
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    base = sql_server(request.param, "run the store suite")
    url = f"{base}?table_prefix=ci_{uuid.uuid4().hex[:8]}_"
    asyncio.run(_tables(url, create=True))
    yield url
    asyncio.run(_tables(url, create=False))
