"""The shipped store suite on the real PostgreSQL and MariaDB servers of this machine.

Each session uses its own table prefix, creates the schema explicitly (servers never get it
implicitly), and drops its tables at the end. A server that cannot be reached skips loudly
on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from agentevents.conformance_tests.test_outbox import *  # noqa: F403
from agentevents.conformance_tests.test_store import *  # noqa: F403
from agentevents.stores.sql.store import SqlEventStore

SERVERS = {
    "postgresql": ("127.0.0.1", 5432, "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
    "mariadb": ("127.0.0.1", 3306, "mysql+asyncmy://root@127.0.0.1:3306/test"),
}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


async def _tables(url: str, create: bool) -> None:
    store = SqlEventStore(url)
    try:
        if create:
            await store.create_schema()
        else:
            await store.drop_schema()
    finally:
        await store.close()


@pytest.fixture(scope="session", params=sorted(SERVERS))
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    host, port, base = SERVERS[request.param]
    if not _reachable(host, port):
        message = f"{request.param.upper()} NOT REACHABLE at {host}:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run the store suite on it")
        pytest.skip(f"{message}: store suite not run on it")
    url = f"{base}?table_prefix=ci_{uuid.uuid4().hex[:8]}_"
    asyncio.run(_tables(url, create=True))
    yield url
    asyncio.run(_tables(url, create=False))
