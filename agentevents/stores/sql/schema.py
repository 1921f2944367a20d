"""The SQL store's tables, in SQLAlchemy Core, portable to SQLite, PostgreSQL and MySQL/MariaDB.

``{prefix}events`` (default prefix ``agentevents_``), one row per event:

==================  =============  =============================================================
column              type           meaning
==================  =============  =============================================================
``position``        BIGINT PK      global position, assigned by the database (autoincrement)
``event_id``        VARCHAR(36)    the event's UUID, unique: the idempotency key
``stream_id``       VARCHAR(255)   the stream; unique together with ``stream_version``
``stream_version``  BIGINT         1, 2, 3, ... within the stream
``event_type``      VARCHAR(255)   ``Event.type``
``event_version``   INTEGER        ``Event.version`` (payload schema version)
``event_time_us``   BIGINT         ``Event.time`` as microseconds since the epoch (UTC): exact
                                   on every database, and cheap to index and compare
``source``          VARCHAR(255)   ``Event.source``
``correlation_id``  VARCHAR(255)   nullable
``causation_id``    VARCHAR(255)   nullable
``partition_key``   VARCHAR(255)   ``Event.key``, nullable
``payload``         TEXT           the payload as JSON (LONGTEXT on MySQL: TEXT stops at 64 KiB)
``metadata``        TEXT           the metadata as a JSON object
``recorded_at_us``  BIGINT         when the store committed it, microseconds since the epoch
==================  =============  =============================================================

The unique constraint on ``(stream_id, stream_version)`` is the arbiter between concurrent
writers of a stream (and serves reading a stream); the one on ``event_id`` refuses
duplicates. Queries are read in position order and continue after a position, so the index
of each filter ends with ``position``: ``_type_ix`` ``(event_type, position)``,
``_source_ix`` ``(source, position)`` (an agent's timeline), ``_correlation_ix``
``(correlation_id, position)``; ``_time_ix`` ``(event_time_us)`` serves time ranges, alone
or combined with another; ``read_all`` reads by the primary key.

These tables are created and upgraded by the versioned migrations in
:mod:`agentevents.stores.sql.migrations`; this module always describes the newest
revision, and the tests check that the migrated database matches it exactly.

``{prefix}snapshots``: ``stream_id`` (PK), ``stream_version``, ``state`` (JSON text),
``time_us``.

``{prefix}outbox``: ``position`` (PK), one row per appended event still to be published by
the outbox relay, written in the append's own transaction and deleted once the bus has
acknowledged the event (only for tables with the outbox enabled, see ``settings``).

``{prefix}relay_lease``: ``name`` (PK, at most :data:`LEASE_NAME_LENGTH` characters),
``owner`` (at most :data:`LEASE_OWNER_LENGTH`), ``fence``, ``expires_us``: which relay
process is the active one, until when, and a fencing number that grows on every takeover.

``{prefix}settings``: ``name`` (PK), ``value``: settings of the tables themselves, which
every store object on them obeys whatever its URL says. One so far: ``outbox`` = ``on``
once the outbox was enabled (:data:`OUTBOX_SETTING`): from then on every append records
its events in ``{prefix}outbox``.

On MySQL/MariaDB the tables are InnoDB, ``utf8mb4`` with the binary collation, so ids and
names compare exactly (not case-insensitively) and any Unicode text fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

from agentevents.core.errors import ConfigurationError

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "LEASE_NAME_LENGTH",
    "LEASE_OWNER_LENGTH",
    "OUTBOX_SETTING",
    "Tables",
    "tables",
]

#: Prefix of the table names unless the URL (``?table_prefix=``) or the constructor says.
DEFAULT_TABLE_PREFIX = "agentevents_"
#: The longest relay lease name and owner the ``relay_lease`` table holds.
LEASE_NAME_LENGTH = 64
LEASE_OWNER_LENGTH = 128
#: The ``settings`` row that turns the outbox on for the tables (value ``on``).
OUTBOX_SETTING = "outbox"
_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,39}$|^$")

#: BIGINT everywhere, but INTEGER on SQLite, where only ``INTEGER PRIMARY KEY`` is the
#: auto-assigned rowid.
_POSITION = BigInteger().with_variant(Integer(), "sqlite")
_JSON_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_MYSQL_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


@dataclass(frozen=True, slots=True)
class Tables:
    """The tables of one prefix, and the metadata that creates them."""

    metadata: MetaData
    events: Table
    snapshots: Table
    outbox: Table
    relay_lease: Table
    settings: Table


@lru_cache(maxsize=64)
def tables(prefix: str = DEFAULT_TABLE_PREFIX) -> Tables:
    """The tables of ``prefix``: events, snapshots, outbox, relay_lease and settings."""
    if not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"table prefix {prefix!r} is not allowed: use at most 40 lower-case letters, "
            "digits and underscores, not starting with a digit"
        )
    metadata = MetaData()
    name = f"{prefix}events"
    events = Table(
        name,
        metadata,
        Column("position", _POSITION, primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False),
        Column("stream_id", String(255), nullable=False),
        Column("stream_version", BigInteger, nullable=False),
        Column("event_type", String(255), nullable=False),
        Column("event_version", Integer, nullable=False),
        Column("event_time_us", BigInteger, nullable=False),
        Column("source", String(255), nullable=False),
        Column("correlation_id", String(255)),
        Column("causation_id", String(255)),
        Column("partition_key", String(255)),
        Column("payload", _JSON_TEXT, nullable=False),
        Column("metadata", _JSON_TEXT, nullable=False),
        Column("recorded_at_us", BigInteger, nullable=False),
        UniqueConstraint("event_id", name=f"{name}_event_id_uq"),
        UniqueConstraint("stream_id", "stream_version", name=f"{name}_stream_uq"),
        Index(f"{name}_type_ix", "event_type", "position"),
        Index(f"{name}_source_ix", "source", "position"),
        Index(f"{name}_correlation_ix", "correlation_id", "position"),
        Index(f"{name}_time_ix", "event_time_us"),
        **_MYSQL_OPTIONS,
    )
    snapshots = Table(
        f"{prefix}snapshots",
        metadata,
        Column("stream_id", String(255), primary_key=True),
        Column("stream_version", BigInteger, nullable=False),
        Column("state", _JSON_TEXT, nullable=False),
        Column("time_us", BigInteger, nullable=False),
        **_MYSQL_OPTIONS,
    )
    outbox = Table(
        f"{prefix}outbox",
        metadata,
        Column("position", BigInteger, primary_key=True, autoincrement=False),
        **_MYSQL_OPTIONS,
    )
    relay_lease = Table(
        f"{prefix}relay_lease",
        metadata,
        Column("name", String(LEASE_NAME_LENGTH), primary_key=True),
        Column("owner", String(LEASE_OWNER_LENGTH), nullable=False),
        Column("fence", BigInteger, nullable=False),
        Column("expires_us", BigInteger, nullable=False),
        **_MYSQL_OPTIONS,
    )
    settings = Table(
        f"{prefix}settings",
        metadata,
        Column("name", String(64), primary_key=True),
        Column("value", String(255), nullable=False),
        **_MYSQL_OPTIONS,
    )
    return Tables(
        metadata=metadata, events=events, snapshots=snapshots, outbox=outbox,
        relay_lease=relay_lease, settings=settings,
    )
