"""PostgreSQL LISTEN/NOTIFY for the SQL store: followers wake when any process appends.

On PostgreSQL every append runs ``SELECT pg_notify(<channel>, '<last position>')`` inside
its own transaction; the server delivers the notification when, and only if, that
transaction commits. Notifications never leave their database, and within it the channel
names the tables (:func:`channel_name`): their table prefix and the schema they are in,
so stores of other prefixes, or of the same prefix in another schema (tenants by
``search_path``), do not wake each other. The schema is the one the ``{prefix}events``
table resolves to on the connection (its ``search_path``), else ``current_schema()``
(where ``create_schema()`` would create it), asked once per connection by the appender
and by the listener alike (:func:`schema_sql`), so both name the same channel.

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

Nothing here waits on the network without a bound: opening and setting up a connection
takes at most :data:`CONNECT_TIMEOUT`, a health check :data:`HEALTH_CHECK_TIMEOUT`, and
closing one (on :meth:`~AppendListener.close`, or before a reconnect) at most
:data:`CLOSE_TIMEOUT`, after which the socket is simply dropped: on a network that
swallows packets, a graceful close would otherwise wait for TCP to give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["AppendListener", "application_name", "channel_name", "schema_sql"]

log = logging.getLogger("agentevents.stores.sql")

#: Seconds between health checks of an idle LISTEN connection (a silently dead TCP
#: connection never reports itself).
HEALTH_CHECK_INTERVAL: Final = 15.0
#: Seconds a health check (``SELECT 1``) may take before the connection counts as lost.
HEALTH_CHECK_TIMEOUT: Final = 5.0
#: Seconds opening a LISTEN connection (connect, LISTEN, head read) may take.
CONNECT_TIMEOUT: Final = 10.0
#: Seconds a graceful close of the LISTEN connection may take before the socket is dropped.
CLOSE_TIMEOUT: Final = 2.0
#: Reconnect backoff: first delay and cap, in seconds.
RECONNECT_DELAY: Final = 0.1
MAX_RECONNECT_DELAY: Final = 5.0
#: PostgreSQL's longest identifier, channel names included (NAMEDATALEN - 1), in bytes.
MAX_CHANNEL_BYTES: Final = 63


def channel_name(table_prefix: str, schema: str) -> str:
    """The NOTIFY channel of the tables with ``table_prefix`` in ``schema``.

    ``<prefix>appended_<12 hex digits of a hash of the schema>``: at most 61 bytes for the
    longest prefix (40 characters), whatever the schema's name (up to 63 bytes, any
    characters), so it is never truncated, and it is a plain identifier.
    """
    digest = hashlib.blake2b(schema.encode(), digest_size=6).hexdigest()
    channel = f"{table_prefix}appended_{digest}"
    assert len(channel.encode()) <= MAX_CHANNEL_BYTES, channel
    return channel


def schema_sql(events_table: str) -> str:
    """SQL (no parameters) for the schema that ``events_table`` resolves to on this
    connection; ``current_schema()`` if there is no such table (yet)."""
    # The table name is a validated prefix plus "events": lower-case letters, digits, "_".
    return (
        "SELECT COALESCE((SELECT n.nspname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.oid = to_regclass('{events_table}')), current_schema(), '')"
    )


def application_name(channel: str) -> str:
    """The ``application_name`` of the LISTEN connection of ``channel`` (max. 63 bytes)."""
    return f"agentevents-listen:{channel}"[:63]


class AppendListener:
    """Listens for the append notifications of one set of tables on a dedicated connection.

    ``table_prefix`` and ``events_table`` name the tables (the channel is derived from
    them and the schema, see :func:`channel_name`). ``on_position`` is called (in the event
    loop) with every notified position, and with the head read after each (re)connect.
    ``head_sql`` is the query for that head.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        table_prefix: str,
        events_table: str,
        head_sql: str,
        on_position: Callable[[int], None],
        shown_url: str,
    ) -> None:
        self._engine = engine
        self._prefix = table_prefix
        self._schema_sql = schema_sql(events_table)
        self._channel = ""
        self._head_sql = head_sql
        self._on_position = on_position
        self._shown = shown_url
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._connections = 0
        self._changed: asyncio.Event | None = None

    @property
    def connected(self) -> bool:
        """Whether notifications are being received right now."""
        return self._connected

    @property
    def channel(self) -> str:
        """The channel listened on ("" before the first connection resolved it)."""
        return self._channel

    @property
    def connections(self) -> int:
        """How many LISTEN connections have been set up so far (1 after the first, ...)."""
        return self._connections

    async def wait_connected(self, after: int = 0) -> int:
        """Wait until a LISTEN connection later than the ``after``-th one is up (listening,
        head reported); return its number (:attr:`connections`). For tests and tooling."""
        while not (self._connected and self._connections > after):
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        return self._connections

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        if connected:
            self._connections += 1
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def start(self) -> None:
        """Start listening in the background (idempotent); call from the event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"agentevents LISTEN {self._prefix}"
            )

    async def close(self) -> None:
        """Stop listening and close the connection (idempotent).

        Bounded: a connection that does not answer is dropped after :data:`CLOSE_TIMEOUT`.
        """
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
        conn: AsyncConnection | None = None
        driver: Any = None  # an asyncpg.Connection
        try:
            lost = asyncio.Event()
            async with asyncio.timeout(CONNECT_TIMEOUT):
                conn = await self._engine.connect()
                raw = await conn.get_raw_connection()
                driver = raw.driver_connection
                conn.sync_connection.detach()  # type: ignore[union-attr]  # closed, not pooled
                driver.add_termination_listener(lambda _conn: lost.set())
                self._channel = channel_name(self._prefix, await driver.fetchval(self._schema_sql))
                # Named, so that operators (and tests) can tell it apart in pg_stat_activity.
                await driver.execute(
                    f"SET application_name = '{application_name(self._channel)}'")
                await driver.add_listener(self._channel, self._notified)
                try:
                    head = await driver.fetchval(self._head_sql)
                except Exception as exc:  # no tables yet: notifications still work
                    if driver.is_closed():
                        raise
                    log.debug("could not read the head at %s: %r", self._shown, exc)
                else:
                    self._on_position(int(head or 0))
            self._set_connected(True)
            while not driver.is_closed():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEALTH_CHECK_INTERVAL):
                        await lost.wait()
                if lost.is_set():
                    return
                async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):
                    await driver.fetchval("SELECT 1")
        finally:
            if self._connected:
                self._set_connected(False)
            await _close(conn, driver)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            position = int(payload)
        except ValueError:
            log.debug("ignored a notification %r on %s", payload, self._channel)
            return
        self._on_position(position)


async def _close(conn: AsyncConnection | None, driver: Any) -> None:
    """Close the LISTEN connection: gracefully within :data:`CLOSE_TIMEOUT`, else drop it.

    asyncpg's graceful close sends Terminate and waits for the server to hang up, which on
    a network that swallows packets lasts until TCP gives up; ``terminate()`` only closes
    the socket. Never raises (also not when called while the task is being cancelled).
    """
    if driver is not None and not driver.is_closed():
        try:
            await driver.close(timeout=CLOSE_TIMEOUT)  # on timeout, asyncpg aborts the socket
        except Exception as exc:
            log.debug("dropped the LISTEN connection without a graceful close: %r", exc)
            with contextlib.suppress(Exception):
                driver.terminate()
    if conn is not None:
        # The driver connection is closed already: this only ends SQLAlchemy's bookkeeping.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await conn.close()
