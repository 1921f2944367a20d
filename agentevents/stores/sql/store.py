"""``SqlEventStore``: the event store on SQLAlchemy 2 async Core.

One code path serves SQLite (aiosqlite, the embedded default), PostgreSQL (asyncpg) and
MySQL/MariaDB (asyncmy): plain SELECT / INSERT / DELETE, no dialect-specific SQL, except
on the hot paths below. The tables are described in :mod:`agentevents.stores.sql.schema`.

An append is one transaction: read the stream's current version, check the expected
version (:func:`~agentevents.core.store.check_expected_version`), insert the batch with the
next versions, get the positions the database assigned, commit. The positions come back
from the insert itself where the database has ``INSERT ... RETURNING`` (PostgreSQL, SQLite
3.35+, MariaDB 10.5+), as ``(position, stream_version)`` pairs matched to the events by
version, never by the order of the rows; elsewhere (MySQL) a second statement reads them.
On these hot paths the drivers run the statements themselves, past SQLAlchemy's layers,
which cost more than the statements do: asyncpg an append's statements and the reads on
PostgreSQL; aiosqlite and asyncmy the version read and the insert where it returns the
positions, the outbox rows, SQLite's ``BEGIN IMMEDIATE`` and the MySQL/MariaDB
commit-order lock. Their errors are translated as SQLAlchemy's are, and a connection they
leave broken, or in the middle of a statement, is discarded. SQLAlchemy's ``echo``, logging
and cursor events do not see these statements; the rest of the store's still go through it.

The unique constraint on ``(stream_id, stream_version)`` is the arbiter: of two writers
that read the same version, the second insert fails, its transaction rolls back, and it
gets ``ConcurrencyError`` (an ``ANY`` append simply retries). An insert fails the same way
on a stored event id; after the rollback the store looks the batch's ids up to tell a
duplicate (``DuplicateEventError``) from a lost race, without parsing driver messages.

No holes that fill later
------------------------
A reader that has seen position ``p`` must never later find a new event below ``p``. That
holds when positions are assigned in commit order. On SQLite it does: the write
transaction starts with ``BEGIN IMMEDIATE``, which takes the database's single write lock
before the version is read, and keeps it until COMMIT; the position (the rowid,
``max + 1``) is assigned under that lock, so the commit order is the position order. In
one process the writes of a store also queue on an :class:`asyncio.Lock` first, so they
wait there rather than in SQLite's busy handler. Readers run in WAL mode, alongside.

PostgreSQL sequences and MySQL/MariaDB auto-increment counters hand out numbers when the
row is inserted, not when it commits: transaction A takes 10, B takes 11, B commits, a
reader sees 11, then A commits 10 behind it. On those servers every write transaction
therefore first takes a commit-order lock, held until it has committed, so positions are
again assigned in commit order:

* PostgreSQL: ``pg_advisory_xact_lock(k)``, ``k`` derived from the table prefix; released
  by the server at COMMIT or ROLLBACK.
* MySQL/MariaDB: ``GET_LOCK('agentevents:<prefix>', timeout)``, released with
  ``RELEASE_LOCK`` right after the commit (by asyncmy itself: through SQLAlchemy it would
  begin a transaction, and cost a COMMIT, of its own). The connection is discarded if that
  fails or is interrupted, which ends the session and so the lock.

The cost is that appends to one set of tables are serialised, across processes, like on
SQLite; readers are not affected. Stores with different table prefixes do not contend.

Waking followers
----------------
Appends through a store object wake its own waiters in
:meth:`~SqlEventStore.wait_for_append` at once. On PostgreSQL an append also sends
``pg_notify(<channel>, '<last position>')`` in its transaction (delivered at commit),
and the first ``wait_for_append`` of a store object opens one dedicated ``LISTEN``
connection (:mod:`agentevents.stores.sql.listen`), so appends by other processes wake
followers too. The channel names the table prefix and the schema the tables are in
(:func:`~agentevents.stores.sql.listen.channel_name`, resolved once per store object on
its first append): tenants with the same prefix in different schemas do not wake each
other. SQLite and MySQL/MariaDB have no such signal: followers poll, with backoff
(:meth:`~agentevents.core.store.EventStore.subscribe`).

The outbox
----------
The outbox is a setting of the tables, not of a store object or its URL: once it is
enabled, every append to the tables, through any store object with any URL, also inserts
one row per event, its position, into ``{prefix}outbox``, in the same transaction: the
events are stored and recorded for publication together, or not at all. It is enabled
explicitly, once, never on connect: ``agentevents schema enable-outbox --store URL``
(:meth:`SqlEventStore.enable_outbox`), or ``agentevents schema upgrade`` /
:meth:`SqlEventStore.create_schema` on a store opened with ``?outbox=true`` (SQLite
stores, which create their schema on first use, do that on first use). It is recorded as
the ``outbox`` row of ``{prefix}settings``.

``?outbox=true`` (or ``outbox=True``) does not turn anything on by itself: it says that
this store object *needs* the outbox (the relay's store does). Its appends and outbox calls
fail with :class:`~agentevents.core.errors.OutboxNotInTablesError`, naming the command to
run, while the tables do not have it; a store without the option simply follows the tables.

Each store object reads the setting in its append's transaction (after the commit-order
lock, so as of that moment) and keeps it: "on" for good, "off" for at most
:data:`OUTBOX_SETTING_TTL` seconds, so an append costs no extra query once the outbox is
on, and one per second per store object while it is off. Enabling it on tables in use
therefore waits that long before it returns: every append that starts afterwards, in any
process, is recorded. Events appended before are not (nothing publishes them).

The store implements
:class:`~agentevents.core.outbox.Outbox` for the relay (:mod:`agentevents.relay`): the
relay lease is a row of ``{prefix}relay_lease``, read ``FOR UPDATE`` (a row lock on the
servers; SQLite's write lock) in the transaction that takes, renews or checks it, so a
takeover and a fenced delete of published rows never interleave. These transactions do not
take the commit-order lock: they do not assign positions, and so do not hold up appends.
The one exception is the insert of an outbox's first lease row, once: under that lock, so
that relays of two names cannot both insert one (an outbox is relayed under one name; a
lease of another name is refused with :class:`~agentevents.core.errors.RelayNameError`).

Schema
------
The tables are versioned by Alembic migrations shipped in the package
(:mod:`agentevents.stores.sql.migrations`). ``await store.create_schema()``, or
``agentevents schema upgrade --store URL``, creates them or upgrades them to the newest
revision; it is idempotent, and safe when several stores or processes run it at once: each
upgrade holds the table prefix's schema lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL
``pg_advisory_xact_lock``, MySQL/MariaDB ``GET_LOCK``), so the later ones find the head
revision and do nothing. ``await store.schema_revision()`` (``agentevents schema current``)
reads the revision, ``await store.drop_schema()`` (``agentevents schema drop``) drops it all.

Nothing is created implicitly on a server: PostgreSQL and MySQL/MariaDB stores need the
explicit upgrade once per release (an append before it fails with a hint to run it). SQLite
stores, the embedded default, upgrade themselves on first use (``auto_create_schema``).

Each table prefix has its own revision, in ``{prefix}alembic_version``, so several prefixes
share a database independently. Tables from before migrations (no version table) are
recognised by which tables exist, stamped with that revision, then upgraded.

Every read path has its index (EXPLAIN-checked on PostgreSQL, SQLite and MariaDB by
``tests/test_sql_explain.py``); every query is read in position order:

=====================================  ==============================================
read path                              index (of ``{prefix}events``)
=====================================  ==============================================
agent timeline (``source``)            ``_source_ix`` ``(source, position)``
... over a time range                  ``_source_ix`` (and ``_time_ix``)
workflow (``correlation_id``)          ``_correlation_ix`` ``(correlation_id, position)``
by type(s)                             ``_type_ix`` ``(event_type, position)``
time range (``since`` / ``until``)     ``_time_ix`` ``(event_time_us)``
``read_stream``, ``stream_id``         ``_stream_uq`` ``(stream_id, stream_version)``
``read_all``, ``after_position``       the primary key ``(position)``
=====================================  ==============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import sqlite3
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast
from uuid import UUID

from sqlalchemy import Select, delete, event, func, insert, select, text, update
from sqlalchemy.engine import URL, Connection, Dialect, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import PoolResetState, StaticPool

from agentevents.core.errors import (
    AgentEventsError,
    BackendConnectionError,
    ConcurrencyError,
    ConfigurationError,
    CorruptEventError,
    DuplicateEventError,
    EventValidationError,
    LeaseLostError,
    OutboxNotInTablesError,
    RelayNameError,
    StoreClosedError,
    StoreError,
)
from agentevents.core.event import Event, construct_checked, utcnow
from agentevents.core.outbox import Lease
from agentevents.core.store import (
    ANY,
    EventQuery,
    EventStore,
    ExpectedVersion,
    RecordedEvent,
    Snapshot,
    check_expected_version,
)
from agentevents.core.urls import redact_url
from agentevents.stores._common import (
    aware_utc,
    check_batch,
    from_micros,
    json_dumps,
    json_loads,
    to_micros,
    url_flag,
)
from agentevents.stores.sql.listen import AppendListener, channel_name, schema_sql
from agentevents.stores.sql.schema import (
    DEFAULT_TABLE_PREFIX,
    LEASE_NAME_LENGTH,
    LEASE_OWNER_LENGTH,
    OUTBOX_SETTING,
    Tables,
    tables,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence

__all__ = ["SqlEventStore"]

#: The asyncio driver used when a URL names only the database (``postgresql://...``).
ASYNC_DRIVERS: Final = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "mysql": "mysql+asyncmy",
    "mariadb": "mariadb+asyncmy",
}
#: How often an ``ANY`` append retries after losing a race for the stream's next version.
ANY_RETRIES: Final = 50
#: Seconds a SQLite connection waits for another connection's write lock (``?timeout=``).
SQLITE_BUSY_TIMEOUT: Final = 30.0
#: Seconds a MySQL/MariaDB writer waits for the commit-order lock before giving up.
COMMIT_LOCK_TIMEOUT: Final = 30
#: Seconds a store object keeps reading "off" for the tables' outbox setting before it reads
#: it again ("on" is kept for good); enabling the outbox on tables in use waits this long.
OUTBOX_SETTING_TTL: Final = 1.0
#: Seconds a MySQL/MariaDB schema change waits for another one to finish before giving up.
SCHEMA_LOCK_TIMEOUT: Final = 600
_WRITE: Final = "agentevents_write"
#: In a connection's ``info``: its last transaction ended cleanly (see _reset_unless_ended).
_ENDED: Final = "agentevents_ended"
#: In a SQLite connection's ``info``: its next BEGIN is sent by :meth:`SqlEventStore._open`.
_DRIVER_BEGIN: Final = "agentevents_driver_begin"
#: SQLSTATE classes of a lost connection (08: connection exception; 57P0x: the server or an
#: administrator ended the session), and of a missing table or column.
_CONNECTION_STATES: Final = ("08", "57P0")
_MISSING_SCHEMA_STATES: Final = frozenset({"42P01", "42703"})
_SCHEMA_HINT: Final = (" (if its tables do not exist yet, run `await store.create_schema()` or "
                       "`agentevents schema upgrade` once)")
_ID_CHUNK: Final = 500
#: ``event_version`` is an INTEGER column on every database: 32-bit signed.
_MAX_EVENT_VERSION: Final = 2**31 - 1
#: The most rows, and bytes of values, one INSERT of a SQLite or MariaDB append sends; a
#: bigger batch takes several statements (in its one transaction). The bytes stay far below
#: MariaDB's ``max_allowed_packet`` (16 MiB by default), like asyncmy's own multi-row
#: inserts (1 MB); SQLite binds at most ``insertmanyvalues_max_parameters`` values.
_INSERT_ROWS: Final = 1000
_INSERT_BYTES: Final = 1_000_000
_UNIQUE_VIOLATION: Final = "23505"
_T = TypeVar("_T")


class _Collision(Exception):
    """An insert hit a unique constraint; raised inside the transaction to roll it back."""


#: The columns of an event row sent to PostgreSQL as one array each, with the array types.
_PG_ARRAY_COLUMNS: Final = (
    "event_id", "event_type", "event_version", "event_time_us", "source", "correlation_id",
    "causation_id", "partition_key", "payload", "metadata",
)
_PG_ARRAY_TYPES: Final = ("text", "text", "int4", "int8", "text", "text", "text", "text",
                          "text", "text")
#: The columns of a row inserted by :meth:`SqlEventStore._insert_returning`, in order.
_ROW_COLUMNS: Final = (*_PG_ARRAY_COLUMNS, "stream_id", "stream_version", "recorded_at_us")
_event_values = itemgetter(*_PG_ARRAY_COLUMNS)


@dataclass(frozen=True)
class _PostgresStatements:
    """The SQL of an append on PostgreSQL, made once per store (asyncpg ``$n`` style)."""

    max_version: str
    insert: str
    insert_outbox: str

    @classmethod
    def of(cls, names: Tables, dialect: Dialect) -> _PostgresStatements:
        quote = dialect.identifier_preparer.format_table
        events, outbox = quote(names.events), quote(names.outbox)
        n = len(_PG_ARRAY_COLUMNS)
        arrays = ", ".join(f"${i}::{kind}[]" for i, kind in enumerate(_PG_ARRAY_TYPES, 1))
        cols = ", ".join(_PG_ARRAY_COLUMNS)
        picked = ", ".join(f"r.{name}" for name in _PG_ARRAY_COLUMNS)
        stream, base, recorded_at, channel = (f"${n + i}" for i in range(1, 5))
        # Positions come from the sequence in the order rows are inserted: ORDER BY the
        # ordinality makes that the batch's order. The notification is one row (an
        # aggregate), materialised, so it is sent once per append.
        inserted = (
            f"WITH ins AS (INSERT INTO {events} ({cols}, stream_id, stream_version, "
            f"recorded_at_us) SELECT {picked}, {stream}::text, {base}::int8 + r.n, "
            f"{recorded_at}::int8 FROM unnest({arrays}) WITH ORDINALITY "
            f"AS r({cols}, n) ORDER BY r.n RETURNING position, stream_version), "
            f"note AS MATERIALIZED (SELECT pg_notify({channel}::text, max(position)::text) "
            f"FROM ins)"
        )
        tail = " SELECT ins.position FROM ins CROSS JOIN note ORDER BY ins.stream_version"
        return cls(
            max_version=(f"SELECT max(stream_version) FROM {events} WHERE stream_id = $1"),
            insert=inserted + tail,
            insert_outbox=(inserted + f", ob AS (INSERT INTO {outbox} (position) "
                           f"SELECT position FROM ins)" + tail),
        )


@dataclass(frozen=True)
class _DriverStatements:
    """The SQL that aiosqlite or asyncmy run themselves (``?`` or ``%s`` parameters), made
    once per store: an append's version read and inserts, and MariaDB's commit-order lock."""

    max_version: str
    #: ``INSERT INTO events (...) VALUES``: then :attr:`values` once per row, and
    #: :attr:`returning`.
    insert: str
    values: str
    returning: str
    #: ``INSERT INTO outbox (position) VALUES``: then :attr:`outbox_values` once per row.
    outbox: str
    outbox_values: str
    #: MySQL/MariaDB: the commit-order lock.
    get_lock: str
    release_lock: str

    @classmethod
    def of(cls, names: Tables, dialect: Dialect) -> _DriverStatements:
        mark = "?" if dialect.name == "sqlite" else "%s"
        quote = dialect.identifier_preparer
        events = quote.format_table(names.events)
        columns = ", ".join(quote.quote(name) for name in _ROW_COLUMNS)
        return cls(
            max_version=f"SELECT max(stream_version) FROM {events} WHERE stream_id = {mark}",
            insert=f"INSERT INTO {events} ({columns}) VALUES ",
            values=f"({', '.join([mark] * len(_ROW_COLUMNS))})",
            returning=f" RETURNING {quote.quote('position')}, stream_version",
            outbox=f"INSERT INTO {quote.format_table(names.outbox)} "
                   f"({quote.quote('position')}) VALUES ",
            outbox_values=f"({mark})",
            get_lock=f"SELECT GET_LOCK({mark}, {mark})",
            release_lock=f"SELECT RELEASE_LOCK({mark})",
        )


class _FirstLease(Exception):
    """The outbox has no relay lease yet: insert it under the commit-order lock."""


class SqlEventStore(EventStore):
    """An event store in a SQL database, through SQLAlchemy's asyncio Core.

    ``url`` is a SQLAlchemy URL (``sqlite+aiosqlite:///events.db``,
    ``postgresql+asyncpg://user:pw@host/db``, ``mysql+asyncmy://user:pw@host/db``); a URL
    without a driver gets the asyncio one. ``?table_prefix=`` in the URL, or
    ``table_prefix``, names the tables (default ``agentevents_``); the argument wins.
    ``auto_create_schema`` creates the tables on first use; it defaults to on for SQLite
    and off for servers, which need :meth:`create_schema` once. ``engine_options`` go to
    :func:`~sqlalchemy.ext.asyncio.create_async_engine` (pool size, echo, ...).
    ``outbox`` (or ``?outbox=true``; default off; the argument wins) says that this store
    object needs the outbox: appends are recorded for the relay whenever the *tables* have
    the outbox enabled (see "The outbox" above), and with this option they fail while the
    tables do not, with :class:`~agentevents.core.errors.OutboxNotInTablesError`, instead
    of silently not being recorded. :meth:`create_schema` on such a store enables it.

    No connection is made before the first call.
    """

    def __init__(
        self,
        url: str,
        *,
        table_prefix: str | None = None,
        auto_create_schema: bool | None = None,
        engine_options: Mapping[str, Any] | None = None,
        outbox: bool | None = None,
    ) -> None:
        self._shown = redact_url(url)
        try:
            sa_url = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise ConfigurationError(f"{self._shown!r} is not a valid SQL store URL") from exc
        query_prefix = sa_url.query.get("table_prefix")
        if table_prefix is None:
            table_prefix = query_prefix if isinstance(query_prefix, str) else DEFAULT_TABLE_PREFIX
        self._tables = tables(table_prefix)
        query_outbox = sa_url.query.get("outbox")
        if outbox is None:
            outbox = (url_flag(query_outbox, "outbox", self._shown)
                      if isinstance(query_outbox, str) else False)
        # Whether this store object needs the outbox; whether the tables have it (as last
        # read, and when: "on" is kept for good, "off" re-read after OUTBOX_SETTING_TTL).
        self._outbox_needed = outbox
        self._outbox = False
        self._outbox_read_at: float | None = None
        sa_url = _with_async_driver(
            sa_url.difference_update_query(["table_prefix", "outbox"])
        )
        self._backend = sa_url.get_backend_name()
        self._sqlite = self._backend == "sqlite"
        self._lock_name = f"agentevents:{table_prefix}"[:64]
        # A stable signed 64-bit key per table prefix for pg_advisory_xact_lock.
        self._lock_key = int.from_bytes(
            hashlib.blake2b(self._lock_name.encode(), digest_size=8).digest(), "big", signed=True
        )
        options = dict(engine_options or {})
        # Every store transaction ends with its own COMMIT or ROLLBACK: on aiosqlite and
        # asyncmy the pool's rollback on return, one more round trip per transaction, is
        # skipped for connections _open marks as ended (_reset_unless_ended).
        reset_if_open = ("pool_reset_on_return" not in options
                         and sa_url.get_driver_name() in ("aiosqlite", "asyncmy"))
        if reset_if_open:
            options["pool_reset_on_return"] = None
        if self._sqlite and "timeout" not in sa_url.query:
            options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT,
                                       **options.get("connect_args", {})}
        try:
            self._engine = create_async_engine(sa_url, **options)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise ConfigurationError(
                f"cannot use {self._shown!r} as an event store: {exc}"
            ) from exc
        if reset_if_open:
            event.listen(self._engine.sync_engine, "reset", _reset_unless_ended)
        if self._sqlite:
            event.listen(self._engine.sync_engine, "connect", _sqlite_connect)
            event.listen(self._engine.sync_engine, "begin", _sqlite_begin)
        # One shared connection (SQLite ``:memory:``) cannot run two transactions at once:
        # then every operation takes the lock, not only writes.
        self._single_connection = isinstance(self._engine.sync_engine.pool, StaticPool)
        self._lock = asyncio.Lock()
        self._auto_schema = self._sqlite if auto_create_schema is None else auto_create_schema
        self._schema_ready = False
        self._schema_lock = asyncio.Lock()
        self._seen_head = 0
        self._wakeup: asyncio.Event | None = None
        self._channel = ""  # PostgreSQL: resolved by the first append (_before_append)
        self._listener: AppendListener | None = None
        self._pg: _PostgresStatements | None = None
        # The drivers whose own API the SQLite and MySQL/MariaDB appends use.
        self._driver_sql: _DriverStatements | None = None
        if self._engine.dialect.driver in ("aiosqlite", "asyncmy"):
            self._driver_sql = _DriverStatements.of(self._tables, self._engine.dialect)
        if self._backend == "postgresql":
            self._pg = _PostgresStatements.of(self._tables, self._engine.dialect)
            t = self._tables.events
            head_sql = str(select(func.max(t.c.position)).compile(dialect=self._engine.dialect))
            self._listener = AppendListener(
                self._engine, table_prefix, t.name, head_sql, self._saw_position, self._shown
            )
        self._closed = False

    def __repr__(self) -> str:
        return f"SqlEventStore({self._shown!r})"

    @property
    def table_prefix(self) -> str:
        """The prefix of this store's table names."""
        return self._tables.events.name.removesuffix("events")

    # -- schema and connections ---------------------------------------------------------

    async def create_schema(self) -> None:
        """Create the tables, or upgrade them to the newest schema revision (idempotent).

        Runs this version's migrations that the database lacks, under the schema lock of
        the table prefix: any number of stores and processes may call it at once. Tables
        from before migrations are stamped with the revision they match, then upgraded.
        On a store opened with ``?outbox=true`` (``outbox=True``) it also enables the
        outbox of the tables, like :meth:`enable_outbox`.
        """
        from agentevents.stores.sql import migrations

        self._check_open()
        async with self._schema_lock:
            async with self._schema_transaction() as conn:
                before, _ = await conn.run_sync(migrations.upgrade, self.table_prefix)
            self._schema_ready = True
        # Tables that did not exist had no writers that could have read "off" from them.
        if self._outbox_needed and await self._write_outbox_setting() and before is not None:
            await asyncio.sleep(OUTBOX_SETTING_TTL)

    async def enable_outbox(self) -> None:
        """Enable the outbox of the tables (idempotent): from now on every append to them,
        through any store object with any URL, records its events for the relay.

        An explicit schema change, like :meth:`create_schema` (which it runs first on a
        store that creates its own schema); the tables must be at the newest revision.
        When it turns the outbox on, it returns only after :data:`OUTBOX_SETTING_TTL`, once
        store objects that read "off" before have read it again: every append that starts
        after it returned is recorded. ``agentevents schema enable-outbox`` runs it.
        """
        from agentevents.stores.sql import migrations

        self._check_open()
        if self._auto_schema and not self._schema_ready:
            await self.create_schema()
        revision, head = await self.schema_revision(), migrations.head_revision()
        if revision != head:
            raise StoreError(
                f"cannot enable the outbox of the tables of {self._shown}: they are at schema "
                f"revision {revision or 'none'}, not {head}; upgrade them first "
                "(`agentevents schema upgrade`, or `await store.create_schema()`)"
            )
        if await self._write_outbox_setting():
            await asyncio.sleep(OUTBOX_SETTING_TTL)

    async def outbox_in_tables(self) -> bool:
        """Whether the tables have the outbox enabled (read now, and kept)."""
        async with self._transaction() as conn:
            return await self._read_outbox_setting(conn)

    async def _read_outbox_setting(self, conn: AsyncConnection) -> bool:
        s = self._tables.settings
        # The clock is read before the query: an "off" is kept for OUTBOX_SETTING_TTL from
        # before the moment it was true, never longer (enable_outbox waits exactly that).
        started = time.monotonic()
        value = await conn.scalar(select(s.c.value).where(s.c.name == OUTBOX_SETTING))
        self._outbox = value == "on"
        self._outbox_read_at = started
        return self._outbox

    async def _write_outbox_setting(self) -> bool:
        """Record "outbox on" in the tables; whether it was off until now.

        Under the commit-order lock, like an append: an append that read "off" inside its
        transaction has committed before this commits.
        """
        s = self._tables.settings
        async with self._open(write=True) as conn:
            value = await conn.scalar(select(s.c.value).where(s.c.name == OUTBOX_SETTING))
            if value is None:
                await conn.execute(insert(s), [{"name": OUTBOX_SETTING, "value": "on"}])
            elif value != "on":
                await conn.execute(update(s).where(s.c.name == OUTBOX_SETTING)
                                   .values(value="on"))
        self._outbox = True
        self._outbox_read_at = time.monotonic()
        return value != "on"

    def _outbox_error(self) -> OutboxNotInTablesError:
        return OutboxNotInTablesError(
            repr(self),
            f"`agentevents schema enable-outbox --store '{self._shown}'` (or "
            "`await store.enable_outbox()`; or `agentevents schema upgrade` / `await "
            "store.create_schema()` with '?outbox=true' in the URL)",
        )

    async def _before_append(self, conn: AsyncConnection) -> None:
        """In an append's transaction, after the commit-order lock: the NOTIFY channel
        (once), and the outbox setting of the tables (while it is off: at most once per
        :data:`OUTBOX_SETTING_TTL`, and on every append of a store that needs it)."""
        read_at = self._outbox_read_at
        if not self._outbox and (self._outbox_needed or read_at is None
                                 or time.monotonic() - read_at >= OUTBOX_SETTING_TTL):
            await self._read_outbox_setting(conn)  # fails if there are no tables (yet)
            if not self._outbox and self._outbox_needed:
                raise self._outbox_error()
        if self._backend == "postgresql" and not self._channel:  # the tables exist
            schema = await conn.scalar(text(schema_sql(self._tables.events.name)))
            self._channel = channel_name(self.table_prefix, str(schema or ""))

    async def schema_revision(self) -> str | None:
        """The schema revision of this store's tables; None if they are not versioned.

        None means no tables, or tables created before migrations existed (which
        :meth:`create_schema` stamps). Never creates anything.
        """
        from agentevents.stores.sql import migrations

        self._check_open()
        async with self._open(write=False) as conn:
            return await conn.run_sync(migrations.current_revision, self.table_prefix)

    async def drop_schema(self) -> None:
        """Drop this store's tables (those of its table prefix) with everything in them, and
        its schema revision."""
        from agentevents.stores.sql import migrations

        self._check_open()
        async with self._schema_lock:
            async with self._schema_transaction() as conn:
                await conn.run_sync(migrations.drop, self.table_prefix)
            self._schema_ready = False
            self._seen_head = 0  # positions start again: a stale head would wake followers
            self._outbox, self._outbox_read_at = False, None  # so is the outbox setting

    @contextlib.asynccontextmanager
    async def _schema_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction holding the table prefix's schema lock, across processes.

        SQLite: ``BEGIN IMMEDIATE`` (the database's write lock). PostgreSQL:
        ``pg_advisory_xact_lock`` on a key of its own, released at COMMIT. MySQL/MariaDB:
        ``GET_LOCK``, released after the commit, so that the next holder sees the revision.
        Appends do not take this lock (nor the schema changes the commit-order lock).
        """
        name = f"agentevents-schema:{self.table_prefix}"[:64]
        named = name if self._backend in ("mysql", "mariadb") else None
        async with self._open(write=self._sqlite, release=named) as conn:
            if self._backend == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": _lock_key(name)})
                yield conn
            elif self._backend in ("mysql", "mariadb"):
                got = await conn.scalar(text("SELECT GET_LOCK(:name, :timeout)"),
                                        {"name": name, "timeout": SCHEMA_LOCK_TIMEOUT})
                if got != 1:
                    raise StoreError(
                        f"timed out after {SCHEMA_LOCK_TIMEOUT} s waiting for the schema lock "
                        f"{name!r} at {self._shown}; another schema change holds it"
                    )
                yield conn  # _open commits, then releases the lock
            else:
                yield conn

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self!r} is closed; create a new store")

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        """A transaction, after creating the schema if this store does that itself."""
        self._check_open()
        if self._auto_schema and not self._schema_ready:
            await self.create_schema()
        async with self._open(write=write) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _open(self, *, write: bool,
                    release: str | None = None) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed on exit; driver errors translated.

        On MySQL/MariaDB a write also takes the commit-order lock, and ``release`` names a
        lock the caller takes (the schema lock): either is released after the transaction
        ended, and the connection discarded if that fails.
        """
        serialise = self._sqlite and (write or self._single_connection)
        async with self._lock if serialise else contextlib.nullcontext():
            try:
                conn = await self._engine.connect()
            except (SQLAlchemyError, OSError) as exc:
                raise BackendConnectionError(
                    f"cannot connect to the event store at {self._shown}: {_reason(exc)}"
                ) from exc
            ordered = write and self._backend in ("postgresql", "mysql", "mariadb")
            if ordered and self._backend != "postgresql":
                release = self._lock_name
            ended = False  # the transaction committed (or rolled back) by conn.begin()
            try:
                if write and self._sqlite:
                    await conn.execution_options(**{_WRITE: True})
                    conn.info[_DRIVER_BEGIN] = True  # _sqlite_begin leaves this one to us
                async with conn.begin():
                    if write and self._sqlite:
                        # Sent by aiosqlite itself: a third of the cost through SQLAlchemy.
                        await self._driver_fetch(conn, "BEGIN IMMEDIATE", ())
                    if ordered:
                        await self._take_commit_order_lock(conn)
                    yield conn
                ended = True
            except AgentEventsError:
                raise  # translated already (BackendConnectionError is an OSError too)
            except (SQLAlchemyError, OSError) as exc:
                raise self._translate(exc) from exc
            finally:
                try:
                    if release is not None:
                        await self._release_named_lock(conn, release)
                finally:  # even when the release was interrupted: back to the pool
                    if not conn.invalidated:
                        if write and self._sqlite:
                            conn.info.pop(_DRIVER_BEGIN, None)  # if the begin never came
                        if ended:  # committed, and any named lock released
                            conn.info[_ENDED] = True
                    await conn.close()

    async def _take_commit_order_lock(self, conn: AsyncConnection) -> None:
        if self._backend == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": self._lock_key})
            return
        if self._driver_sql is not None:  # by asyncmy itself, like the append's statements
            [(got,)] = await self._driver_fetch(conn, self._driver_sql.get_lock,
                                                (self._lock_name, COMMIT_LOCK_TIMEOUT))
        else:
            got = await conn.scalar(text("SELECT GET_LOCK(:name, :timeout)"),
                                    {"name": self._lock_name, "timeout": COMMIT_LOCK_TIMEOUT})
        if got != 1:
            raise StoreError(
                f"timed out after {COMMIT_LOCK_TIMEOUT} s waiting for the commit-order lock "
                f"{self._lock_name!r} at {self._shown}; another writer holds it too long"
            )

    async def _release_named_lock(self, conn: AsyncConnection, name: str) -> None:
        """After the transaction ended: release the MySQL/MariaDB lock ``name`` (a
        ``GET_LOCK``; releasing one not held does nothing).

        An invalidated connection's session has ended, and the lock with it. Sent by asyncmy
        itself: through SQLAlchemy the statement would begin a transaction, and need one
        more COMMIT.
        """
        if conn.invalidated:
            return
        try:
            if self._driver_sql is not None:
                await self._driver_fetch(conn, self._driver_sql.release_lock, (name,))
            else:
                await conn.scalar(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
                await conn.commit()
        except Exception:  # the session must not keep the lock: end it
            with contextlib.suppress(Exception):
                await conn.invalidate()

    def _translate(self, exc: BaseException) -> Exception:
        reason = _reason(exc)
        if (
            isinstance(exc, (InterfaceError, OSError, PoolTimeoutError))
            or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        ):
            return BackendConnectionError(
                f"lost the connection to the event store at {self._shown}: {reason}"
            )
        hint = ""
        if isinstance(exc, (ProgrammingError, OperationalError)) and not self._auto_schema:
            hint = _SCHEMA_HINT
        return StoreError(f"the event store at {self._shown} failed: {reason}{hint}")

    # -- writing ------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        expected_version: ExpectedVersion = ANY,
    ) -> list[RecordedEvent]:
        """Append atomically; an empty batch only checks ``expected_version``."""
        self._check_open()
        check_batch(events)
        rows = [_event_row(e) for e in events]  # encode before taking any lock
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._transaction(write=True) as conn:
                    await self._before_append(conn)
                    if self._pg is not None:
                        recorded = await self._insert_postgresql(
                            conn, stream_id, events, rows, expected_version,
                            outbox=self._outbox)
                    else:
                        if self._driver_sql is not None and conn.dialect.insert_returning:
                            recorded = await self._insert_returning(
                                conn, self._driver_sql, stream_id, events, rows,
                                expected_version)
                        else:
                            recorded = await self._insert(
                                conn, stream_id, events, rows, expected_version)
                        if recorded:
                            await self._record_append(conn, recorded)
                break
            except _Collision:
                pass
            stored = await self._stored_ids([row["event_id"] for row in rows])
            if stored:
                raise DuplicateEventError(stored)
            if expected_version is not ANY or attempt >= ANY_RETRIES:
                raise ConcurrencyError(
                    stream_id, expected_version, await self.stream_version(stream_id)
                )
            # Lost a race for the stream's next version: retry, spread out a little so the
            # losers do not all collide again.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * attempt)))
        if recorded:
            self._saw_position(recorded[-1].position)
        return recorded

    async def _record_append(self, conn: AsyncConnection, recorded: list[RecordedEvent]) -> None:
        """In the append's transaction: the outbox rows (SQLite, MySQL/MariaDB), by
        aiosqlite or asyncmy itself in one multi-row INSERT per :data:`_INSERT_ROWS` rows."""
        if not self._outbox:
            return
        sql = self._driver_sql
        if sql is None:
            await conn.execute(insert(self._tables.outbox),
                               [{"position": r.position} for r in recorded])
            return
        most = min(_INSERT_ROWS, conn.dialect.insertmanyvalues_max_parameters)
        for start in range(0, len(recorded), most):
            positions = [r.position for r in recorded[start : start + most]]
            await self._driver_fetch(
                conn, sql.outbox + ", ".join([sql.outbox_values] * len(positions)), positions)

    async def _insert_postgresql(
        self,
        conn: AsyncConnection,
        stream_id: str,
        events: Sequence[Event],
        rows: list[dict[str, Any]],
        expected_version: ExpectedVersion,
        *,
        outbox: bool,
    ) -> list[RecordedEvent]:
        """:meth:`_insert` on PostgreSQL, by asyncpg itself, in two statements.

        The version read, then one statement that inserts the whole batch from arrays
        (``unnest``), records it in the outbox, notifies the followers and returns the
        positions. It runs on the connection of the transaction ``conn`` began (the
        commit-order lock's statement started it). Compared with SQLAlchemy's
        ``executemany`` + position read + outbox insert + ``pg_notify`` (five round trips
        and one Bind/Execute per row), this is what lets a batch append keep up with raw
        inserts (``benchmarks/bench_sql.py``).
        """
        pg = cast("_PostgresStatements", self._pg)
        driver: Any = (await conn.get_raw_connection()).driver_connection
        current = await self._driver_call(conn, driver.fetchval(pg.max_version, stream_id))
        check_expected_version(stream_id, expected_version, current)
        if not rows:
            return []
        base = current or 0
        now = utcnow()
        columns = [[row[name] for row in rows] for name in _PG_ARRAY_COLUMNS]
        statement = pg.insert_outbox if outbox else pg.insert
        records = await self._driver_call(conn, driver.fetch(
            statement, *columns, stream_id, base, to_micros(now), self._channel))
        positions = [record[0] for record in records]
        return [
            RecordedEvent(event=e, stream_id=stream_id, version=base + i, position=p,
                          recorded_at=now)
            for i, (e, p) in enumerate(zip(events, positions, strict=True), start=1)
        ]

    def _saw_position(self, position: int) -> None:
        """Events up to ``position`` are committed: wake the waiters below it."""
        if position > self._seen_head:
            self._seen_head = position
            self._wake()

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    async def _insert(
        self,
        conn: AsyncConnection,
        stream_id: str,
        events: Sequence[Event],
        rows: list[dict[str, Any]],
        expected_version: ExpectedVersion,
    ) -> list[RecordedEvent]:
        t = self._tables.events
        current = await conn.scalar(
            select(func.max(t.c.stream_version)).where(t.c.stream_id == stream_id)
        )
        check_expected_version(stream_id, expected_version, current)
        if not rows:
            return []
        base = current or 0
        now = utcnow()
        recorded_at = to_micros(now)
        params = [
            {**row, "stream_id": stream_id, "stream_version": base + i,
             "recorded_at_us": recorded_at}
            for i, row in enumerate(rows, start=1)
        ]
        # SQLite and MySQL/MariaDB (PostgreSQL: _insert_postgresql). The positions are read
        # back in a second statement: INSERT ... RETURNING in order (SQLAlchemy's
        # sort_by_parameter_order) measured no faster on MariaDB and three times slower on
        # SQLite (benchmarks/bench_sql.py).
        try:
            await conn.execute(insert(t), params)
        except IntegrityError as exc:
            raise _Collision from exc
        positions = (
            await conn.scalars(
                select(t.c.position)
                .where(t.c.stream_id == stream_id)
                .where(t.c.stream_version.between(base + 1, base + len(rows)))
                .order_by(t.c.stream_version)
            )
        ).all()
        return [
            RecordedEvent(event=e, stream_id=stream_id, version=base + i, position=p,
                          recorded_at=now)
            for i, (e, p) in enumerate(zip(events, positions, strict=True), start=1)
        ]

    async def _insert_returning(
        self,
        conn: AsyncConnection,
        sql: _DriverStatements,
        stream_id: str,
        events: Sequence[Event],
        rows: list[dict[str, Any]],
        expected_version: ExpectedVersion,
    ) -> list[RecordedEvent]:
        """:meth:`_insert` on SQLite 3.35+ and MariaDB 10.5+, by aiosqlite or asyncmy itself.

        The version read, then one multi-row ``INSERT ... RETURNING position,
        stream_version`` per :data:`_INSERT_ROWS` rows or :data:`_INSERT_BYTES` of values.
        The rows come back in no promised order: each position goes to the event of its
        version. Compared with SQLAlchemy's ``executemany`` and a second statement reading
        the positions, this saves a round trip and SQLAlchemy's own cost per statement
        (``benchmarks/bench_sql.py``).
        """
        [(current,)] = await self._driver_fetch(conn, sql.max_version, (stream_id,))
        check_expected_version(stream_id, expected_version, current)
        if not rows:
            return []
        base = current or 0
        now = utcnow()
        recorded_at = to_micros(now)
        most = min(_INSERT_ROWS,
                   conn.dialect.insertmanyvalues_max_parameters // len(_ROW_COLUMNS))
        positions: dict[int, int] = {}
        values: list[Any] = []
        count = size = 0
        for version, row in enumerate(rows, start=base + 1):
            row_values = (*_event_values(row), stream_id, version, recorded_at)
            row_size = sum(len(v) if v.isascii() else len(v.encode())
                           for v in row_values if isinstance(v, str))
            if count and (count == most or size + row_size > _INSERT_BYTES):
                await self._insert_rows(conn, sql, count, values, positions)
                values, count, size = [], 0, 0
            values.extend(row_values)
            count, size = count + 1, size + row_size
        await self._insert_rows(conn, sql, count, values, positions)
        return [
            RecordedEvent(event=e, stream_id=stream_id, version=v, position=positions[v],
                          recorded_at=now)
            for v, e in enumerate(events, start=base + 1)
        ]

    async def _insert_rows(self, conn: AsyncConnection, sql: _DriverStatements, count: int,
                           values: list[Any], positions: dict[int, int]) -> None:
        """Insert ``count`` rows of ``values``; record their positions by stream version."""
        statement = sql.insert + ", ".join([sql.values] * count) + sql.returning
        try:
            returned = await self._driver_fetch(conn, statement, values)
        except IntegrityError as exc:
            raise _Collision from exc
        if len(returned) != count:
            raise StoreError(f"the event store at {self._shown} returned {len(returned)} "
                             f"positions for {count} inserted events")
        for position, version in returned:
            positions[version] = position

    async def _driver_fetch(self, conn: AsyncConnection, sql: str,
                            params: Sequence[Any]) -> list[Any]:
        """The rows of one statement run by aiosqlite or asyncmy itself, in ``conn``'s
        transaction. Its errors are wrapped as SQLAlchemy wraps them (a unique violation is
        an :class:`IntegrityError`), and a connection that failed, or was left in the middle
        of a statement, is invalidated, as SQLAlchemy does: it does not see them."""
        driver: Any = (await conn.get_raw_connection()).driver_connection
        try:
            if self._sqlite:
                return list(await driver.execute_fetchall(sql, params))
            async with driver.cursor() as cursor:
                await cursor.execute(sql, params)
                return list(await cursor.fetchall())
        except BaseException as exc:
            dialect = conn.dialect
            error = dialect.loaded_dbapi.Error
            if isinstance(exc, error) and not dialect.is_disconnect(exc, None, None):
                raise DBAPIError.instance(
                    sql, None, exc, error, dialect=dialect,
                    hide_parameters=self._engine.sync_engine.hide_parameters) from exc
            # Lost, interrupted, or the client failed (asyncmy raises AttributeError then).
            with contextlib.suppress(Exception):
                await conn.invalidate()
            if not isinstance(exc, Exception):
                raise
            raise BackendConnectionError(
                f"lost the connection to the event store at {self._shown}: "
                f"{_reason(exc)}") from exc

    async def _stored_ids(self, ids: list[str]) -> list[str]:
        t = self._tables.events
        found: list[str] = []
        async with self._transaction() as conn:
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                found.extend(
                    await conn.scalars(select(t.c.event_id).where(t.c.event_id.in_(chunk)))
                )
        return found

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the stream's snapshot (delete + insert in one transaction)."""
        self._check_open()
        s = self._tables.snapshots
        row = {
            "stream_id": snapshot.stream_id,
            "stream_version": snapshot.version,
            "state": json_dumps(
                snapshot.state, f"snapshot state of {snapshot.stream_id!r}"
            ).decode(),
            "time_us": to_micros(aware_utc(snapshot.time, "snapshot time")),
        }
        for _attempt in range(ANY_RETRIES):
            try:
                async with self._transaction(write=True) as conn:
                    await conn.execute(delete(s).where(s.c.stream_id == snapshot.stream_id))
                    try:
                        await conn.execute(insert(s), [row])
                    except IntegrityError as exc:  # a concurrent save inserted first
                        raise _Collision from exc
                return
            except _Collision:
                continue
        raise StoreError(f"could not save the snapshot of {snapshot.stream_id!r}: "
                         "concurrent saves kept colliding; retry")

    # -- reading ------------------------------------------------------------------------

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        t = self._tables.events
        stmt = (
            select(t)
            .where(t.c.stream_id == stream_id, t.c.stream_version >= from_version)
            .order_by(t.c.stream_version)
        )
        return await self._records(stmt if limit is None else stmt.limit(max(limit, 0)))

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        t = self._tables.events
        return await self._records(
            select(t)
            .where(t.c.position > after_position)
            .order_by(t.c.position)
            .limit(max(limit, 0))
        )

    async def query(self, query: EventQuery) -> list[RecordedEvent]:
        return await self._records(self._query_statement(query))

    def _query_statement(self, query: EventQuery) -> Select[Any]:
        """The SELECT that serves ``query`` (separate, so tests can EXPLAIN it).

        The index per read path: source (+ time range) ``{prefix}events_source_ix``,
        correlation id ``..._correlation_ix``, types ``..._type_ix``, time range
        ``..._time_ix``, stream ``..._stream_uq``, position alone the primary key.
        """
        t = self._tables.events
        stmt = select(t).where(t.c.position > query.after_position)
        if query.types is not None:
            stmt = stmt.where(t.c.event_type.in_(list(query.types)))
        if query.source is not None:
            stmt = stmt.where(t.c.source == query.source)
        if query.correlation_id is not None:
            stmt = stmt.where(t.c.correlation_id == query.correlation_id)
        if query.stream_id is not None:
            stmt = stmt.where(t.c.stream_id == query.stream_id)
        if query.since is not None:
            stmt = stmt.where(t.c.event_time_us >= to_micros(aware_utc(query.since, "since")))
        if query.until is not None:
            stmt = stmt.where(t.c.event_time_us < to_micros(aware_utc(query.until, "until")))
        stmt = stmt.order_by(t.c.position)
        if query.limit is not None:
            stmt = stmt.limit(max(query.limit, 0))
        return stmt

    async def _records(self, stmt: Select[Any], *,
                       up_to_corrupt: bool = False) -> list[RecordedEvent]:
        """The events of ``stmt``'s rows. A row that cannot be decoded raises
        :class:`CorruptEventError`. With ``up_to_corrupt`` (the outbox) every event is
        also validated in full, and a bad row raises only if it is the first one (the rows
        before it are returned)."""
        async with self._transaction() as conn:
            if self._backend == "postgresql":
                rows: Sequence[Any] = await self._fetch_asyncpg(conn, stmt)
            else:
                rows = (await conn.execute(stmt)).all()
        decoded: list[RecordedEvent] = []
        try:
            _decode_rows(rows, decoded, validate=up_to_corrupt)
        except Exception as exc:  # not what this store wrote: say which row
            if up_to_corrupt and decoded:
                return decoded
            raise self._corrupt(rows[len(decoded)], exc) from exc
        return decoded

    def _corrupt(self, row: Any, exc: Exception) -> CorruptEventError:
        position = int(row[0])
        events, outbox = self._tables.events.name, self._tables.outbox.name
        return CorruptEventError(
            self._shown, position, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            f"Readers stop at it, and so does the outbox relay. Repair the row in {events} "
            f"(position {position}); or, to publish everything after it without it, delete "
            f"it from the outbox: DELETE FROM {outbox} WHERE position = {position}",
        )

    async def _fetch_asyncpg(self, conn: AsyncConnection, stmt: Select[Any]) -> Sequence[Any]:
        """The rows of ``stmt`` fetched by asyncpg itself (records, in column order).

        The same SQL, compiled by SQLAlchemy for asyncpg, but without SQLAlchemy's result
        layer, which costs more than the query: raw ``fetch`` reads pages of events about
        three times as fast (``benchmarks/bench_sql.py``). Driver errors are translated here.
        """
        compiled = stmt.compile(dialect=conn.dialect,
                                compile_kwargs={"render_postcompile": True})
        values = compiled.construct_params()
        args = [values[name] for name in compiled.positiontup or ()]
        driver: Any = (await conn.get_raw_connection()).driver_connection
        rows: Sequence[Any] = await self._driver_call(conn, driver.fetch(str(compiled), *args))
        return rows

    async def _driver_call(self, conn: AsyncConnection, call: Awaitable[_T]) -> _T:
        """Await a call of asyncpg itself on ``conn``'s driver connection; its errors
        translated here, as SQLAlchemy does not see them. A unique violation (an insert's
        collision) is :class:`_Collision`."""
        try:
            return await call
        except Exception as exc:  # asyncpg's own errors, not wrapped by SQLAlchemy
            driver: Any = (await conn.get_raw_connection()).driver_connection
            state = str(getattr(exc, "sqlstate", None) or "")
            if state == _UNIQUE_VIOLATION:
                raise _Collision from exc
            if driver.is_closed() or not state or state.startswith(_CONNECTION_STATES):
                # The connection or the client failed, not the query (a query's error
                # leaves the connection open): SQLAlchemy did not see it, so keep the
                # connection out of the pool here.
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise BackendConnectionError(
                    f"lost the connection to the event store at {self._shown}: "
                    f"{_reason(exc)}") from exc
            hint = _SCHEMA_HINT if state in _MISSING_SCHEMA_STATES and not self._auto_schema \
                else ""
            raise StoreError(
                f"the event store at {self._shown} failed: {_reason(exc)}{hint}") from exc

    async def stream_version(self, stream_id: str) -> int | None:
        t = self._tables.events
        async with self._transaction() as conn:
            version: int | None = await conn.scalar(
                select(func.max(t.c.stream_version)).where(t.c.stream_id == stream_id)
            )
        return version

    async def head_position(self) -> int:
        t = self._tables.events
        async with self._transaction() as conn:
            head: int | None = await conn.scalar(select(func.max(t.c.position)))
        return head or 0

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        s = self._tables.snapshots
        async with self._transaction() as conn:
            row = (await conn.execute(select(s).where(s.c.stream_id == stream_id))).first()
        if row is None:
            return None
        return Snapshot(
            stream_id=row.stream_id,
            version=row.stream_version,
            state=json_loads(row.state),
            time=from_micros(row.time_us),
        )

    async def wait_for_append(self, after_position: int, timeout: float) -> None:
        """Return when events past ``after_position`` are known to exist, or after ``timeout``.

        Appends by this store object wake waiters at once. On PostgreSQL so do appends by
        any other process or store object (LISTEN/NOTIFY on a dedicated connection, opened
        by the first call); while that connection is down, and on SQLite and
        MySQL/MariaDB, other writers' events are found by the caller's next read after
        the timeout, so ``timeout`` is the polling interval for those.
        """
        self._check_open()
        if self._listener is not None:
            self._listener.start()
        if self._seen_head > after_position:
            return
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        wakeup = self._wakeup
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await wakeup.wait()

    async def close(self) -> None:
        """Release the connection pool (idempotent); later calls raise StoreClosedError."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        if self._listener is not None:
            await self._listener.close()
        await self._engine.dispose()

    # -- the outbox (agentevents.core.outbox.Outbox) -------------------------------------

    @property
    def outbox_enabled(self) -> bool:
        """Whether this store object needs the outbox (``?outbox=true``), or has found it
        enabled in its tables: then its appends are recorded (the setting is the tables')."""
        return self._outbox_needed or self._outbox

    async def _check_outbox(self) -> None:
        """Raise :class:`OutboxNotInTablesError` unless the tables have the outbox (once
        found on, no query any more)."""
        self._check_open()
        if not self._outbox and not await self.outbox_in_tables():
            raise self._outbox_error()

    async def acquire_relay_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        _check_lease_names(name, owner)
        await self._check_outbox()
        now = _now_us()
        expires = now + max(int(ttl * 1_000_000), 1)
        try:
            try:
                # The servers lock the lease row; SQLite takes its write lock up front.
                async with self._transaction(write=self._sqlite) as conn:
                    fence = await self._take_lease(conn, name, owner, now, expires,
                                                   insert_first=self._sqlite)
            except _FirstLease:
                # No lease yet. The first one is inserted under the commit-order lock, once
                # per outbox: relays of two names starting together cannot both insert one.
                async with self._transaction(write=True) as conn:
                    fence = await self._take_lease(conn, name, owner, now, expires,
                                                   insert_first=True)
        except _Collision:
            return None
        if fence is None:
            return None
        return Lease(name=name, owner=owner, fence=fence, expires_at=from_micros(expires))

    async def _take_lease(self, conn: AsyncConnection, name: str, owner: str, now: int,
                          expires: int, *, insert_first: bool) -> int | None:
        """In a transaction: take or renew the lease; its fence, or None if another holds it.

        Raises :class:`RelayNameError` if the outbox has a lease of another name, and
        ``_FirstLease`` if it has none and ``insert_first`` is false.
        """
        lease = self._tables.relay_lease
        # No locking read of a missing row: on MySQL/MariaDB that takes a gap lock, and two
        # first relays would deadlock on their inserts.
        names = list(await conn.scalars(select(lease.c.name).order_by(lease.c.name)))
        others = [held for held in names if held != name]
        if others:  # one outbox is relayed under one name
            quoted = others[0].replace("'", "''")
            raise RelayNameError(repr(self), name, others[0],
                                 f"DELETE FROM {lease.name} WHERE name = '{quoted}'")
        row = None
        if names:
            row = (await conn.execute(
                select(lease.c.owner, lease.c.fence, lease.c.expires_us)
                .where(lease.c.name == name).with_for_update()
            )).first()
        if row is None:
            if not insert_first:
                raise _FirstLease
            try:
                await conn.execute(insert(lease), [{
                    "name": name, "owner": owner, "fence": 1, "expires_us": expires,
                }])
            except IntegrityError as exc:  # another relay inserted it first
                raise _Collision from exc
            return 1
        if row.owner != owner and row.expires_us > now:
            return None
        fence: int = row.fence if row.owner == owner else row.fence + 1
        await conn.execute(
            update(lease).where(lease.c.name == name)
            .values(owner=owner, fence=fence, expires_us=expires)
        )
        return fence

    async def release_relay_lease(self, lease: Lease) -> None:
        await self._check_outbox()
        t = self._tables.relay_lease
        async with self._transaction(write=self._sqlite) as conn:
            await conn.execute(
                update(t)
                .where(t.c.name == lease.name, t.c.owner == lease.owner,
                       t.c.fence == lease.fence)
                .values(expires_us=0)
            )

    async def read_outbox(self, limit: int) -> list[RecordedEvent]:
        """The oldest ``limit`` events of the outbox; fewer if one of them cannot be read.

        A row that cannot be decoded (changed outside agentevents) ends the batch before
        it; when it is the first one, :class:`~agentevents.core.errors.CorruptEventError`
        names it: the relay publishes up to it, then stops there, loudly.
        """
        await self._check_outbox()
        t, o = self._tables.events, self._tables.outbox
        return await self._records(
            select(t).join(o, o.c.position == t.c.position)
            .order_by(o.c.position).limit(max(limit, 0)),
            up_to_corrupt=True,
        )

    async def mark_published(self, lease: Lease, positions: Sequence[int]) -> None:
        await self._check_outbox()
        t, o = self._tables.relay_lease, self._tables.outbox
        async with self._transaction(write=self._sqlite) as conn:
            row = (await conn.execute(
                select(t.c.owner, t.c.fence).where(t.c.name == lease.name).with_for_update()
            )).first()
            if row is None or (row.owner, row.fence) != (lease.owner, lease.fence):
                raise LeaseLostError(lease.name, lease.owner, lease.fence)
            for start in range(0, len(positions), _ID_CHUNK):
                chunk = list(positions[start : start + _ID_CHUNK])
                await conn.execute(delete(o).where(o.c.position.in_(chunk)))


def _now_us() -> int:
    return time.time_ns() // 1000


def _check_lease_names(name: str, owner: str) -> None:
    if not 0 < len(name) <= LEASE_NAME_LENGTH or not 0 < len(owner) <= LEASE_OWNER_LENGTH:
        raise ConfigurationError(
            f"relay lease name {name!r} and owner {owner!r} must be 1 to {LEASE_NAME_LENGTH} "
            f"and 1 to {LEASE_OWNER_LENGTH} characters long"
        )


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``, derived from ``name``."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                          signed=True)


def _with_async_driver(url: URL) -> URL:
    driver = ASYNC_DRIVERS.get(url.drivername)
    return url if driver is None else url.set(drivername=driver)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN over from the sqlite3 module (it would only begin before DML).
    dbapi_connection.isolation_level = None
    # Let readers work beside the writer: WAL (persistent, so the first connection that
    # manages it switches the file; in-memory databases stay "memory"). Switching needs the
    # file to itself; without waiting for it, since a connection that waits there while a
    # writer waits for it to go deadlocks until the busy timeout. A later connection retries.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode")
        if cursor.fetchone()[0] not in ("wal", "memory"):
            cursor.execute("PRAGMA busy_timeout")
            busy_timeout = int(cursor.fetchone()[0])
            cursor.execute("PRAGMA busy_timeout = 0")
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:  # busy: another connection holds the file
                pass
            finally:
                cursor.execute(f"PRAGMA busy_timeout = {busy_timeout}")
    finally:
        cursor.close()


def _reset_unless_ended(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
    """The pool's reset of a connection on its return (aiosqlite, asyncmy): a rollback,
    unless :meth:`SqlEventStore._open` marked the connection's transaction as ended (its
    COMMIT or ROLLBACK went through, its named lock was released) and nothing used the
    connection since. Not asyncmy's own transaction flag: it is only updated by successful
    replies, so a failed first statement of a transaction leaves it saying "none open"
    while the server holds that transaction's locks."""
    ended = record.info.pop(_ENDED, False)
    if state.terminate_only:  # the pool closes it: nothing to reset
        return
    if ended:
        return
    driver = dbapi_connection.driver_connection
    if getattr(driver, "in_transaction", True):  # aiosqlite: sqlite3's own, always current
        dbapi_connection.rollback()


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock before the version is read: writers are serialised.
    # _open sends a write transaction's first BEGIN IMMEDIATE through aiosqlite itself, right
    # after this (cheaper); any later one in the same connection (a transaction that
    # committed midway and began again) is sent here, so no write ever runs in autocommit.
    if conn.info.pop(_DRIVER_BEGIN, False):
        return
    immediate = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _event_row(event: Event) -> dict[str, Any]:
    if event.version > _MAX_EVENT_VERSION:
        raise EventValidationError(
            f"event {event.id}: version {event.version} does not fit the SQL store's "
            f"event_version column (INTEGER, at most {_MAX_EVENT_VERSION}); payload schema "
            "versions are small numbers")
    return {
        "event_id": str(event.id),
        "event_type": event.type,
        "event_version": event.version,
        "event_time_us": to_micros(event.time),
        "source": event.source,
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "partition_key": event.key,
        "payload": json_dumps(event.payload, f"payload of event {event.id}").decode(),
        "metadata": json_dumps(event.metadata, f"metadata of event {event.id}").decode(),
    }


def _decode_rows(rows: Sequence[Any], decoded: list[RecordedEvent], *,
                 validate: bool = False) -> None:
    """Append rows of the events table (all columns, in table order) to ``decoded`` as
    :class:`RecordedEvent` objects, in order; raise what decoding or validating one raised
    (it is ``rows[len(decoded)]``).

    Unpacked positionally (``Row`` attribute access by name costs more than the query).
    The values were validated as an :class:`Event` when they were appended, so they are
    not validated again (:func:`construct_checked`): reading is bound by this per row.
    With ``validate`` they are (the outbox: what is published must be a valid event even
    if the row was changed since). The rows of one append have one ``recorded_at``: a row
    with the value of the row before it gets that row's datetime (equal values, equal
    datetimes), not a new one.
    """
    recorded_us: object = _NOTHING  # equal to no value: the first row makes its datetime
    recorded_at = from_micros(0)
    for (position, event_id, stream_id, stream_version, event_type, event_version, time_us,
         source, correlation_id, causation_id, key, payload, metadata,
         recorded_at_us) in rows:
        if recorded_at_us != recorded_us:
            recorded_at = from_micros(recorded_at_us)
            recorded_us = recorded_at_us
        fields = (
            UUID(event_id), event_type, event_version, from_micros(time_us), source,
            correlation_id, causation_id, key, json_loads(payload),
            {} if metadata == "{}" else json_loads(metadata),
        )
        if validate:
            event = Event.model_validate(dict(zip(_EVENT_FIELDS, fields, strict=True)))
        else:
            event = construct_checked(*fields)
        decoded.append(RecordedEvent(event, stream_id, stream_version, position, recorded_at))


_NOTHING: Final = object()


_EVENT_FIELDS: Final = ("id", "type", "version", "time", "source", "correlation_id",
                        "causation_id", "key", "payload", "metadata")


def _reason(exc: BaseException) -> str:
    """The driver's own error, first line only, secrets in it redacted like URLs."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return redact_url(f"{type(orig).__name__}: {text}" if text else type(orig).__name__)
