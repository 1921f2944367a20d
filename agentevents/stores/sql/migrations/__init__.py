"""Versioned migrations of the SQL store's tables, with Alembic, one history per table prefix.

Users never touch Alembic: :meth:`SqlEventStore.create_schema()
<agentevents.stores.sql.store.SqlEventStore.create_schema>` and ``agentevents schema upgrade``
call :func:`upgrade` on the store's own connection (Alembic's "sharing a connection" recipe:
the connection and the table prefix travel in ``Config.attributes``; no ``alembic.ini``).

* The revisions live in ``versions/`` next to this file and ship in the wheel. Their ids are
  sequence numbers, ``0001``, ``0002``, ... Each spells its tables out (no import of
  :mod:`~agentevents.stores.sql.schema`): a migration is frozen once released, while
  ``schema.py`` always describes the newest revision. The test suite compares the migrated
  database with ``schema.py`` on every database, so the two cannot drift apart.
* The table prefix is a runtime parameter: a revision names its tables with
  :func:`table_prefix`. Each prefix has its own version table, ``{prefix}alembic_version``,
  so several prefixes (several stores, or test runs) share one database independently.
* Tables created before migrations existed (``create_all``, no version table) are
  recognised by which tables are there, stamped at the revision they match, then upgraded.

The caller holds the schema lock (:meth:`SqlEventStore.create_schema` does), so concurrent
upgrades of one prefix run one after the other and the later ones find nothing to do.

To write the next revision: copy the newest file in ``versions/`` (``script.py.mako`` is
the template Alembic's own ``revision`` command uses), give it the next number and the
previous one as ``down_revision``, change ``schema.py`` to match, and run
``tests/test_sql_migrations.py``, which fails while the two differ.

========  ===========================================================================
revision  change
========  ===========================================================================
``0001``  ``events`` (with its unique constraints and indexes) and ``snapshots``
``0002``  ``outbox`` and ``relay_lease``
``0003``  ``events_source_ix`` becomes ``(source, position)`` (was ``(source,
          event_time_us)``), so an agent's timeline is read in position order
``0004``  ``settings``: settings of the tables, e.g. whether the outbox is on (it was a
          per-URL option before)
========  ===========================================================================
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from alembic import command, op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData, Table, inspect

from agentevents.core.errors import StoreError
from agentevents.stores.sql.schema import tables

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection

__all__ = [
    "alembic_config",
    "current_revision",
    "drop",
    "head_revision",
    "include_name",
    "table_prefix",
    "unversioned_revision",
    "upgrade",
    "version_table",
]

_LOCATION: Final = str(Path(__file__).parent)

#: Revisions that tables from before migrations match, newest first: the tables each one
#: has. ``create_all`` made all of a release's tables at once, so these are the only states.
_UNVERSIONED: Final = (
    ("0002", ("events", "snapshots", "outbox", "relay_lease")),
    ("0001", ("events", "snapshots")),
)


def version_table(prefix: str) -> str:
    """The name of the table holding the schema revision of ``prefix``'s tables."""
    return f"{prefix}alembic_version"


def include_name(prefix: str) -> Callable[[str | None, str, Any], bool]:
    """An Alembic ``include_name`` hook that sees only ``prefix``'s tables (autogenerate)."""
    names = {t.name for t in tables(prefix).metadata.sorted_tables}

    def include(name: str | None, type_: str, _parent: Any) -> bool:
        return type_ != "table" or name in names

    return include


def table_prefix() -> str:
    """Inside a revision's ``upgrade()`` / ``downgrade()``: the prefix being migrated."""
    config = op.get_context().config
    if config is None or "table_prefix" not in config.attributes:
        raise StoreError("the SQL store's migrations run through SqlEventStore.create_schema() "
                         "or `agentevents schema upgrade`, which give the table prefix")
    prefix: str = config.attributes["table_prefix"]
    return prefix


def alembic_config(connection: Connection | None, prefix: str) -> Config:
    """An Alembic :class:`~alembic.config.Config` for ``prefix``'s tables on ``connection``.

    For Alembic commands beyond :func:`upgrade` (``alembic.command.downgrade``,
    ``history``, ...), run on a connection in a transaction, which the caller commits.
    """
    config = Config(attributes={"connection": connection, "table_prefix": prefix})
    config.set_main_option("script_location", _LOCATION)
    return config


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(None, ""))


def head_revision() -> str:
    """The newest revision this version of agentevents knows."""
    head = _scripts().get_current_head()
    assert head is not None, "the SQL store's migrations have no revision"
    return head


def current_revision(connection: Connection, prefix: str) -> str | None:
    """The revision ``prefix``'s tables are at; None without a version table."""
    context = MigrationContext.configure(
        connection, opts={"version_table": version_table(prefix)}
    )
    return context.get_current_revision()


def unversioned_revision(connection: Connection, prefix: str) -> str | None:
    """The revision that ``prefix``'s tables from before migrations match, if there are any.

    None when none of the tables exists; :class:`StoreError` when some exist in no state a
    release created, which a person has to look at.
    """
    ours = {t.name for t in tables(prefix).metadata.sorted_tables}
    present = set(inspect(connection).get_table_names()) & ours
    if not present:
        return None
    for revision, names in _UNVERSIONED:
        if present == {f"{prefix}{name}" for name in names}:
            return revision
    raise StoreError(
        f"found the tables {sorted(present)} but no {version_table(prefix)!r} table: "
        "they match no release of the schema, so its revision is unknown; check them, then "
        "drop them or stamp the revision they are at"
    )


def upgrade(connection: Connection, prefix: str) -> tuple[str | None, str]:
    """Bring ``prefix``'s tables to the head revision; the revisions before and after.

    Idempotent. Runs in the caller's transaction (the caller commits). Unversioned tables
    are stamped first (see :func:`unversioned_revision`).
    """
    head = head_revision()
    before = current_revision(connection, prefix)
    if before == head:
        return before, head
    if before is not None and before not in {s.revision for s in _scripts().walk_revisions()}:
        raise StoreError(
            f"the tables with prefix {prefix!r} are at schema revision {before!r}, which this "
            f"version of agentevents does not know (its newest is {head!r}): a newer "
            "agentevents migrated them; upgrade agentevents"
        )
    config = alembic_config(connection, prefix)
    quiet = _MySqlPrimaryKeyNameNote()
    driver_log = logging.getLogger("asyncmy")
    driver_log.addFilter(quiet)
    try:
        if before is None and (stamp := unversioned_revision(connection, prefix)) is not None:
            command.stamp(config, stamp)
        command.upgrade(config, "head")
    except CommandError as exc:
        raise StoreError(f"cannot migrate the tables with prefix {prefix!r}: {exc}") from exc
    finally:
        driver_log.removeFilter(quiet)
    after = current_revision(connection, prefix)
    assert after == head, f"upgraded to {after!r}, not to the head {head!r}"
    return before, after


class _MySqlPrimaryKeyNameNote(logging.Filter):
    """Drops asyncmy's log line for MySQL's note on Alembic's version table.

    Alembic names the version table's primary key ``{table}_pkc``; MySQL/MariaDB name every
    primary key ``PRIMARY`` and say so in a note, which asyncmy logs as a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "ignored for PRIMARY key" not in record.getMessage()


def drop(connection: Connection, prefix: str) -> None:
    """Drop ``prefix``'s tables and its version table, those that exist."""
    tables(prefix).metadata.drop_all(connection, checkfirst=True)
    Table(version_table(prefix), MetaData()).drop(connection, checkfirst=True)
