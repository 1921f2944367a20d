"""The SQL event store plugin: SQLite (embedded default), PostgreSQL, MySQL/MariaDB.

This module is what the ``sql`` entry point loads, so it imports nothing heavy: the
store itself (:mod:`agentevents.stores.sql.store`, SQLAlchemy's asyncio engine) is imported
when a store is first built. One :class:`BackendInfo` per driver, so a missing driver
names its own extra: ``aiosqlite`` ships with agentevents, ``asyncpg`` comes with
``agentevents[postgres]``, ``asyncmy`` with ``agentevents[mysql]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentevents.plugins.hookspecs import BackendInfo, hookimpl

if TYPE_CHECKING:
    from agentevents.stores.sql.store import SqlEventStore

__all__ = ["SqlEventStore", "agentevents_store_backends"]


def _create(url: str) -> SqlEventStore:
    from agentevents.stores.sql.store import SqlEventStore

    return SqlEventStore(url)


def __getattr__(name: str) -> Any:
    if name == "SqlEventStore":
        from agentevents.stores.sql.store import SqlEventStore

        return SqlEventStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DRIVERS: tuple[tuple[str, tuple[str, ...], str | None, tuple[str, ...], str], ...] = (
    ("sqlite", ("aiosqlite",), None, ("sqlite", "sqlite+aiosqlite"),
     "SQLite file or :memory: (embedded default); creates its tables on first use"),
    ("postgres", ("asyncpg",), "postgres", ("postgresql", "postgresql+asyncpg", "postgres"),
     "PostgreSQL via asyncpg; run `await store.create_schema()` once"),
    ("mysql", ("asyncmy",), "mysql", ("mysql", "mysql+asyncmy", "mariadb", "mariadb+asyncmy"),
     "MySQL/MariaDB via asyncmy; run `await store.create_schema()` once"),
    ("mysql-aiomysql", ("aiomysql",), None, ("mysql+aiomysql", "mariadb+aiomysql"),
     "MySQL/MariaDB via aiomysql; run `await store.create_schema()` once"),
)  # fmt: skip


@hookimpl
def agentevents_store_backends() -> list[BackendInfo]:
    """The SQL store, once per driver (each with its own ``requires`` and extra)."""
    return [
        BackendInfo(name=f"sql-{name}", kind="store", schemes=schemes, factory=_create,
                    requires=requires, extra=extra, description=description)
        for name, requires, extra, schemes, description in _DRIVERS
    ]
