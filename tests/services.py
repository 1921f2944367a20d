"""Reachability of the shared broker and database services the tests run against.

A test module whose server cannot be reached skips loudly on a laptop and fails under
``CI=true``, where every service must be up. Each module calls :func:`require` at import
time with an async probe that raises when the service is unusable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

NATS_URL = os.environ.get("AGENTEVENTS_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("AGENTEVENTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


#: The SQL servers of this machine: kind -> (host, port, base URL of the test database).
SQL_SERVERS = {
    "postgresql": ("127.0.0.1", 5432, "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
    "mariadb": ("127.0.0.1", 3306, "mysql+asyncmy://root@127.0.0.1:3306/test"),
}


def sql_server(kind: str, purpose: str) -> str:
    """The base URL of SQL server ``kind``; skips (laptop) or fails (``CI=true``) the
    calling test, saying what ``purpose`` it served, when the server is not listening."""
    host, port, base = SQL_SERVERS[kind]
    try:
        with socket.create_connection((host, port), timeout=2):
            return base
    except OSError:
        message = f"{kind.upper()} NOT REACHABLE at {host}:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must {purpose} on it", pytrace=False)
        pytest.skip(f"{message}: did not {purpose} on it")


def sql_base(kind: str, tmp_path: Path, purpose: str) -> str:
    """The base URL of a test database: a SQLite file under ``tmp_path`` for ``"sqlite"``,
    else :func:`sql_server` (which skips or fails when the server is not listening)."""
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    return sql_server(kind, purpose)


@contextlib.asynccontextmanager
async def sql_tables(url: str) -> AsyncIterator[str]:
    """The schema of ``url``'s table prefix, created for a test and dropped after it."""
    from agentevents.stores.sql.store import SqlEventStore

    store = SqlEventStore(url)
    await store.create_schema()
    try:
        yield url
    finally:
        await store.drop_schema()
        await store.close()


def require(name: str, where: str, probe: Callable[[], Awaitable[object]],
            timeout: float = 5.0) -> None:
    """Skip (laptop) or fail (``CI=true``) the calling module unless ``probe()`` succeeds."""

    async def bounded() -> None:
        await asyncio.wait_for(probe(), timeout)

    try:
        asyncio.run(bounded())
    except Exception as exc:
        message = f"{name} NOT REACHABLE at {where}: {exc!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


async def probe_nats(url: str = NATS_URL) -> None:
    """Connects, and checks that JetStream is enabled."""
    import nats

    from agentevents.backends.nats.transport import NatsConfig

    host, _, port = NatsConfig.from_url(url).servers[0].split("://", 1)[1].rpartition(":")
    _reader, writer = await asyncio.open_connection(host, int(port))  # fails fast and clearly
    writer.close()
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False,
                            max_reconnect_attempts=0)
    try:
        await nc.jetstream().account_info()
    finally:
        await nc.close()


async def probe_redis(url: str = REDIS_URL) -> None:
    """Connects and PINGs."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2)
    try:
        await client.ping()
    finally:
        await client.aclose()


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``<prefix>:`` on a shared Redis (SCAN + DEL, never a flush)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
        return deleted
    finally:
        client.close()
