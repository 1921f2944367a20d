"""PostgreSQL LISTEN/NOTIFY for the SQL store: followers wake when any process appends.

On PostgreSQL every append runs ``SELECT pg_notify(<channel>, '<last position>')`` inside
its own transaction; the server delivers the notification when, and only if, that
transaction commits. The channel is derived from the table prefix
(:func:`channel_name`), so stores of other prefixes do not wake each other.

An :class:`AppendListener` owns one dedicated connection per store object, opened lazily
by the first :meth:`~agentevents.core.store.EventStore.wait_for_append`. It is taken from
the store's own engine (same URL, credentials and ``connect_args``) and then *detached*
from the pool, so it never occupies a pool slot and is closed, not returned, when done.
On it the listener sets ``application_name`` to ``agentevents-listen:<channel>`` (to find
it in ``pg_stat_activity``), runs ``LISTEN``, then reads the current head once (an append that
committed before the ``LISTEN`` took effect is not missed), and afterwards reports every
notified position to the store, which wakes its waiters.

If the connection cannot be opened or is lost (server restart, a pooler in transaction
mode that does not support ``LISTEN``, a network failure noticed by the periodic health
check), waiters fall back to polling (they return at their timeout and re-read) while the
listener reconnects with backoff in the background. :meth:`close` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["AppendListener", "application_name", "channel_name"]

log = logging.getLogger("agentevents.stores.sql")

#: Seconds between health checks of an idle LISTEN connection (a silently dead TCP
#: connection never reports itself).
HEALTH_CHECK_INTERVAL: Final = 15.0
#: Seconds a health check (``SELECT 1``) may take before the connection counts as lost.
HEALTH_CHECK_TIMEOUT: Final = 5.0
#: Reconnect backoff: first delay and cap, in seconds.
RECONNECT_DELAY: Final = 0.1
MAX_RECONNECT_DELAY: Final = 5.0


def channel_name(table_prefix: str) -> str:
    """The NOTIFY channel of the stores with ``table_prefix`` (a valid identifier)."""
    return f"{table_prefix}appended"


def application_name(channel: str) -> str:
    """The ``application_name`` of the LISTEN connection of ``channel`` (max. 63 bytes)."""
    return f"agentevents-listen:{channel}"[:63]


class AppendListener:
    """Listens for the append notifications of one table prefix on a dedicated connection.

    ``on_position`` is called (in the event loop) with every notified position, and with
    the head read after each (re)connect. ``head_sql`` is the query for that head.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        channel: str,
        head_sql: str,
        on_position: Callable[[int], None],
        shown_url: str,
    ) -> None:
        self._engine = engine
        self._channel = channel
        self._head_sql = head_sql
        self._on_position = on_position
        self._shown = shown_url
        self._task: asyncio.Task[None] | None = None
        self._connected = False

    @property
    def connected(self) -> bool:
        """Whether notifications are being received right now."""
        return self._connected

    def start(self) -> None:
        """Start listening in the background (idempotent); call from the event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"agentevents LISTEN {self._channel}"
            )

    async def close(self) -> None:
        """Stop listening and close the connection (idempotent)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        delay = RECONNECT_DELAY
        failures = 0
        while True:
            try:
                await self._listen_once()
                delay = RECONNECT_DELAY  # it was up: reconnect quickly
                failures = 0
                log.info("lost the LISTEN connection to %s; followers poll until it is back",
                         self._shown)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: poll meanwhile, and retry
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "cannot LISTEN for appends at %s (%r); followers poll "
                        "meanwhile, retrying in the background", self._shown, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)

    async def _listen_once(self) -> None:
        """Open, LISTEN, report the head, then wait until the connection is lost."""
        conn = await self._engine.connect()
        try:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection  # an asyncpg.Connection
            conn.sync_connection.detach()  # type: ignore[union-attr]  # closed, not pooled
            lost = asyncio.Event()
            driver.add_termination_listener(lambda _conn: lost.set())
            # Named, so that operators (and tests) can tell it apart in pg_stat_activity.
            await driver.execute(f"SET application_name = '{application_name(self._channel)}'")
            await driver.add_listener(self._channel, self._notified)
            self._connected = True
            try:
                head = await driver.fetchval(self._head_sql)
            except Exception as exc:  # no tables yet: notifications still work
                log.debug("could not read the head at %s: %r", self._shown, exc)
            else:
                self._on_position(int(head or 0))
            while not driver.is_closed():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEALTH_CHECK_INTERVAL):
                        await lost.wait()
                if lost.is_set():
                    return
                async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):
                    await driver.fetchval("SELECT 1")
        finally:
            self._connected = False
            with contextlib.suppress(Exception):
                await conn.close()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            position = int(payload)
        except ValueError:
            log.debug("ignored a notification %r on %s", payload, self._channel)
            return
        self._on_position(position)
