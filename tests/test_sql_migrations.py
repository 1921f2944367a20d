"""The SQL store's versioned schema: Alembic migrations per table prefix, and the CLI.

Every test runs on SQLite and on the PostgreSQL and MariaDB servers of this machine, each
in a table prefix of its own that is dropped afterwards. A server that cannot be reached
skips loudly on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from services import SQL_SERVERS, sql_server
from sqlalchemy import Index, MetaData, String, Table, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from agentevents import Event, StoreError
from agentevents.cli import app
from agentevents.core.urls import redact_url
from agentevents.plugins import registry
from agentevents.stores import sql
from agentevents.stores.sql import SqlEventStore, migrations
from agentevents.stores.sql.schema import tables
from agentevents.stores.sql.store import _event_row

with contextlib.suppress(ValueError):  # already registered (entry point, other module)
    registry.register(sql, name="sql")

T = TypeVar("T")
HEAD = migrations.head_revision()
NAMES = ("events", "snapshots", "outbox", "relay_lease", "settings")
#: The tables a release made before migrations existed (``create_all``), at its newest.
BEFORE_MIGRATIONS = ("events", "snapshots", "outbox", "relay_lease")


@dataclass(frozen=True)
class Database:
    """One database under test, and the table prefix this test owns in it."""

    kind: str
    base: str  # URL without the table prefix
    prefix: str

    @property
    def url(self) -> str:
        return f"{self.base}?table_prefix={self.prefix}"

    def store(self, **options: Any) -> SqlEventStore:
        return SqlEventStore(self.url, **options)

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn`` on a connection of its own (not the store's), committed afterwards."""
        engine = create_async_engine(self.base)
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(fn)
        finally:
            await engine.dispose()

    async def table_names(self) -> set[str]:
        names = await self.run(lambda conn: inspect(conn).get_table_names())
        return {name for name in names if name.startswith(self.prefix)}


def _drop_prefixed(conn: Connection, prefix: str) -> None:
    for name in inspect(conn).get_table_names():
        if name.startswith(prefix):
            Table(name, MetaData()).drop(conn)


@pytest.fixture(params=["sqlite", *sorted(SQL_SERVERS)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        base = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    else:
        base = sql_server(request.param, "test the migrations")
    database = Database(request.param, base, f"t_{uuid.uuid4().hex[:10]}_")
    yield database
    asyncio.run(database.run(lambda conn: _drop_prefixed(conn, database.prefix)))


@contextlib.asynccontextmanager
async def opened(database: Database, **options: Any) -> AsyncIterator[SqlEventStore]:
    store = database.store(**options)
    try:
        yield store
    finally:
        await store.close()


def _diffs(conn: Connection, prefix: str) -> list[Any]:
    context = MigrationContext.configure(conn, opts={
        "version_table": migrations.version_table(prefix),
        "include_name": migrations.include_name(prefix),
        "compare_type": True,
    })
    return list(compare_metadata(context, tables(prefix).metadata))


# -- the API ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_upgrade_from_empty_creates_every_table_at_head(db: Database) -> None:
    async with opened(db, auto_create_schema=False) as store:
        assert await store.schema_revision() is None
        assert await db.table_names() == set()  # asking created nothing
        await store.create_schema()
        assert await store.schema_revision() == HEAD
    assert await db.table_names() == {
        *(f"{db.prefix}{name}" for name in NAMES), f"{db.prefix}alembic_version"
    }


@pytest.mark.asyncio
async def test_migrated_schema_is_exactly_schema_py(db: Database) -> None:
    # Columns, types, nullability, unique constraints and indexes: a migration that drifts
    # from schema.py (or a schema.py change without its migration) fails here.
    async with opened(db) as store:
        await store.create_schema()
    assert await db.run(lambda conn: _diffs(conn, db.prefix)) == []


@pytest.mark.asyncio
async def test_the_comparison_sees_drift(db: Database) -> None:
    # The check above is only worth something if it notices differences on this database.
    async with opened(db) as store:
        await store.create_schema()
    drifted = MetaData()
    for table in tables(db.prefix).metadata.sorted_tables:
        table.to_metadata(drifted)
    events = drifted.tables[f"{db.prefix}events"]
    events.c.source.type = String(100)
    events.indexes.discard(next(i for i in events.indexes if i.name == f"{events.name}_type_ix"))
    Index(f"{events.name}_extra_ix", events.c.stream_id, events.c.position)
    drifted.tables[f"{db.prefix}relay_lease"].c.owner.nullable = True

    def diffs(conn: Connection) -> set[str]:
        context = MigrationContext.configure(conn, opts={
            "version_table": migrations.version_table(db.prefix),
            "include_name": migrations.include_name(db.prefix),
            "compare_type": True,
        })
        found = compare_metadata(context, drifted)
        return {(d[0][0] if isinstance(d, list) else d[0]) for d in found}

    assert await db.run(diffs) == {"modify_type", "remove_index", "add_index",
                                   "modify_nullable"}


@pytest.mark.asyncio
@pytest.mark.parametrize("db", ["mariadb"], indirect=True)
async def test_mysql_tables_are_innodb_utf8mb4_bin(db: Database) -> None:
    # Table options are invisible to Alembic's comparison: checked here.
    async with opened(db) as store:
        await store.create_schema()
    names = tuple(f"{db.prefix}{name}" for name in NAMES)
    rows = await db.run(lambda conn: conn.exec_driver_sql(
        "SELECT table_name, engine, table_collation FROM information_schema.tables "
        f"WHERE table_schema = DATABASE() AND table_name IN ({', '.join(['%s'] * len(names))})",
        names).all())
    assert {tuple(row) for row in rows} == {(name, "InnoDB", "utf8mb4_bin") for name in names}


@pytest.mark.asyncio
async def test_upgrade_is_idempotent_and_keeps_the_data(db: Database) -> None:
    async with opened(db) as store:
        await store.create_schema()
        await store.append("s", [Event(type="thing.happened")])
        await store.create_schema()
    async with opened(db) as other:  # a new process, say: its first upgrade finds nothing
        await other.create_schema()
        assert await other.schema_revision() == HEAD
        assert await other.stream_version("s") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("in_use", [True, False])
async def test_upgrading_to_0004_keeps_an_outbox_in_use_on(db: Database, in_use: bool) -> None:
    """Before 0004 each writer's URL decided: tables whose outbox holds rows (or a relay
    lease) were relayed, so the upgrade turns their outbox on; others stay off."""
    async with opened(db, outbox=True) as store:
        await store.create_schema()
        await store.append("s", [Event(type="thing.happened")])  # an outbox row
    prefix = db.prefix

    def back_to_0003(conn: Connection) -> None:
        command.downgrade(migrations.alembic_config(conn, prefix), "0003")
        if not in_use:
            conn.execute(text(f"DELETE FROM {prefix}outbox"))

    await db.run(back_to_0003)
    async with opened(db) as store:
        await store.create_schema()
        assert await store.outbox_in_tables() is in_use


@pytest.mark.asyncio
async def test_concurrent_upgrades_from_several_stores(db: Database) -> None:
    stores = [db.store() for _ in range(5)]
    try:
        await asyncio.gather(*(s.create_schema() for s in stores))
        assert {await s.schema_revision() for s in stores} == {HEAD}
        await asyncio.gather(*(s.append(f"s{i}", [Event(type="a.b")])
                               for i, s in enumerate(stores)))
        assert len(await stores[0].read_all()) == 5
    finally:
        for s in stores:
            await s.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("created", "stamped"), [
    (("events", "snapshots"), "0001"),
    (BEFORE_MIGRATIONS, "0002"),
])  # fmt: skip
async def test_tables_from_before_migrations_are_stamped_then_upgraded(
    db: Database, created: tuple[str, ...], stamped: str
) -> None:
    # What create_schema() did before migrations: create_all, no version table.
    metadata = _before_migrations(db.prefix)
    chosen = [metadata.tables[f"{db.prefix}{name}"] for name in created]
    await db.run(lambda conn: metadata.create_all(conn, tables=chosen))
    # An event written by that release (this one appends only to tables at the head).
    row = {**_event_row(Event(type="thing.happened")), "stream_id": "s", "stream_version": 1,
           "recorded_at_us": 0}
    await db.run(lambda conn: conn.execute(tables(db.prefix).events.insert(), [row]))
    async with opened(db, auto_create_schema=False) as store:
        assert await store.schema_revision() is None
        assert await db.run(lambda conn: migrations.unversioned_revision(conn, db.prefix)) \
            == stamped
        await store.create_schema()
        assert await store.schema_revision() == HEAD
        assert await store.stream_version("s") == 1  # the rows survive
    assert await db.run(lambda conn: _diffs(conn, db.prefix)) == []


def _before_migrations(prefix: str) -> MetaData:
    """schema.py as it was before migrations: the source index was (source, event_time_us)."""
    metadata = MetaData()
    for table in tables(prefix).metadata.sorted_tables:
        table.to_metadata(metadata)
    events = metadata.tables[f"{prefix}events"]
    source_ix = next(i for i in events.indexes if i.name == f"{events.name}_source_ix")
    events.indexes.discard(source_ix)
    Index(source_ix.name, events.c.source, events.c.event_time_us)
    return metadata


@pytest.mark.asyncio
async def test_tables_in_no_known_state_are_refused(db: Database) -> None:
    events = tables(db.prefix).events
    await db.run(lambda conn: events.create(conn))
    async with opened(db) as store:
        with pytest.raises(StoreError, match=r"match no release of the schema"):
            await store.create_schema()
    assert await db.table_names() == {events.name}  # nothing was added or stamped


@pytest.mark.asyncio
async def test_a_revision_from_a_newer_agentevents_is_refused(db: Database) -> None:
    async with opened(db) as store:
        await store.create_schema()
    version = migrations.version_table(db.prefix)
    await db.run(lambda conn: conn.exec_driver_sql(f"UPDATE {version} SET version_num = '9999'"))
    async with opened(db) as store:
        with pytest.raises(StoreError, match=r"revision '9999'.*newer agentevents"):
            await store.create_schema()
        assert await store.schema_revision() == "9999"


@pytest.mark.asyncio
async def test_every_revision_downgrades_and_upgrades_again(db: Database) -> None:
    async with opened(db) as store:
        await store.create_schema()
    await db.run(lambda conn: command.downgrade(migrations.alembic_config(conn, db.prefix),
                                                "0001"))
    assert await db.table_names() == {f"{db.prefix}{name}" for name in
                                      ("events", "snapshots", "alembic_version")}
    await db.run(lambda conn: command.downgrade(migrations.alembic_config(conn, db.prefix),
                                                "base"))
    assert await db.table_names() == {f"{db.prefix}alembic_version"}
    async with opened(db) as store:
        await store.create_schema()
        assert await store.schema_revision() == HEAD
    assert await db.run(lambda conn: _diffs(conn, db.prefix)) == []


@pytest.mark.asyncio
async def test_each_prefix_has_its_own_revision(db: Database) -> None:
    other = Database(db.kind, db.base, f"{db.prefix}b_")
    async with opened(db) as first, opened(other, auto_create_schema=False) as second:
        await first.create_schema()
        assert await second.schema_revision() is None
        await second.create_schema()
        await second.drop_schema()
        assert await first.schema_revision() == HEAD
        assert await second.schema_revision() is None


@pytest.mark.asyncio
async def test_drop_schema_removes_the_tables_and_the_revision(db: Database) -> None:
    async with opened(db) as store:
        await store.create_schema()
        await store.drop_schema()
        assert await store.schema_revision() is None
        assert await db.table_names() == set()
        await store.drop_schema()  # nothing left to drop: no error


@pytest.mark.asyncio
async def test_sqlite_creates_its_schema_on_first_use_and_servers_do_not(db: Database) -> None:
    async with opened(db) as store:
        if db.kind == "sqlite":
            await store.append("s", [Event(type="thing.happened")])
            assert await store.schema_revision() == HEAD
        else:
            with pytest.raises(StoreError, match=r"create_schema"):
                await store.append("s", [Event(type="thing.happened")])
            assert await db.table_names() == set()


# -- the CLI ---------------------------------------------------------------------------------


def invoke(*args: str, input: str | None = None, **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=input, env={"COLUMNS": "300", **env})
    return result.exit_code, result.output


def test_cli_upgrade_current_and_drop(db: Database) -> None:
    shown = redact_url(db.url)
    assert invoke("schema", "current", "--store", db.url, "--check") == (1, (
        f"schema of {shown} (tables {db.prefix}*): none (no versioned tables; `agentevents "
        f"schema upgrade` creates them, or stamps tables from before migrations; head is "
        f"{HEAD})\n"))
    assert invoke("schema", "upgrade", "--store", db.url) == (
        0, f"schema of {shown} (tables {db.prefix}*): none -> {HEAD} (head)\n")
    assert invoke("schema", "upgrade", "--store", db.url) == (
        0, f"schema of {shown} (tables {db.prefix}*): {HEAD} (head), nothing to do\n")
    assert invoke("schema", "current", "--store", db.url, "--check") == (
        0, f"schema of {shown} (tables {db.prefix}*): {HEAD} (head)\n")

    code, output = invoke("schema", "drop", "--store", db.url, input="n\n")
    assert code == 1, output
    assert "not dropped" in output
    assert asyncio.run(db.table_names())
    assert invoke("schema", "drop", "--store", db.url, "--yes") == (
        0, f"dropped the tables {db.prefix}* at {shown}\n")
    assert asyncio.run(db.table_names()) == set()


def test_cli_reads_the_store_url_from_the_settings(db: Database) -> None:
    code, output = invoke("schema", "upgrade", AGENTEVENTS_STORE_URL=db.url)
    assert code == 0, output
    assert f"none -> {HEAD} (head)" in output
    assert asyncio.run(db.table_names())


def test_cli_upgrade_of_an_old_schema_prints_both_revisions(db: Database) -> None:
    async def at_0001() -> None:
        async with opened(db) as store:
            await store.create_schema()
        await db.run(lambda conn: command.downgrade(
            migrations.alembic_config(conn, db.prefix), "0001"))

    asyncio.run(at_0001())
    code, output = invoke("schema", "current", "--store", db.url, "--check")
    assert (code, output.split(": ", 1)[1]) == (
        1, f"0001 (head is {HEAD}; run `agentevents schema upgrade`)\n")
    code, output = invoke("schema", "upgrade", "--store", db.url)
    assert (code, output.split(": ", 1)[1]) == (0, f"0001 -> {HEAD} (head)\n")


def test_cli_enable_outbox(db: Database) -> None:
    shown = redact_url(db.url)
    head = f"schema of {shown} (tables {db.prefix}*): {HEAD} (head)"
    enabled = (f"outbox of {shown} (tables {db.prefix}*): on; every append to these tables is "
               "recorded for the relay from now on, whatever the URL of the store that appends\n")
    assert invoke("schema", "upgrade", "--store", db.url)[0] == 0
    assert invoke("schema", "current", "--store", db.url) == (0, f"{head}\n")
    assert invoke("schema", "enable-outbox", "--store", db.url) == (0, enabled)
    assert invoke("schema", "enable-outbox", "--store", db.url) == (
        0, f"outbox of {shown} (tables {db.prefix}*): already on\n")
    assert invoke("schema", "current", "--store", db.url) == (0, f"{head}, outbox on\n")


def test_cli_upgrade_with_outbox_true_enables_it(db: Database) -> None:
    code, output = invoke("schema", "upgrade", "--store", f"{db.url}&outbox=true")
    assert code == 0, output
    assert output.splitlines()[1] == ("outbox: on; every append to these tables is recorded "
                                      "for the relay, whatever the URL of the store that appends")
    assert invoke("schema", "current", "--store", db.url)[1].endswith(", outbox on\n")


def test_cli_enable_outbox_needs_the_newest_revision(db: Database) -> None:
    async def at_0003() -> None:
        async with opened(db) as store:
            await store.create_schema()
        await db.run(lambda conn: command.downgrade(
            migrations.alembic_config(conn, db.prefix), "0003"))

    asyncio.run(at_0003())
    code, output = invoke("schema", "enable-outbox", "--store", db.url)
    if db.kind == "sqlite":  # it upgrades its schema itself (auto_create_schema)
        assert code == 0, output
        return
    assert code == 2, output
    assert f"at schema revision 0003, not {HEAD}; upgrade them first" in output
    assert invoke("schema", "upgrade", "--store", db.url)[0] == 0
    assert invoke("schema", "enable-outbox", "--store", db.url)[0] == 0


# -- CLI errors (no database needed) ---------------------------------------------------------


def test_cli_errors_are_one_line_without_secrets() -> None:
    url = "postgresql+asyncpg://app:hunter2@127.0.0.1:1/db?table_prefix=x_"
    for command_ in ("upgrade", "current"):
        code, output = invoke("schema", command_, "--store", url)
        assert code == 2, output
        assert output.startswith("error: cannot connect to the event store at "
                                 "postgresql+asyncpg://app:***@127.0.0.1:1/db")
        assert "hunter2" not in output
        assert "Traceback" not in output


def test_cli_refuses_a_store_that_is_not_sql() -> None:
    code, output = invoke("schema", "upgrade", "--store", "memory://")
    assert code == 2
    assert "'memory://' is not a SQL store URL" in output


def test_cli_current_on_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    code, output = invoke("schema", "current", "--store", f"sqlite:///{path}")
    assert code == 0, output
    assert ": none (" in output
    assert not path.exists()


def test_migrations_ship_in_the_package() -> None:
    # The wheel carries every file of the package folder (hatchling's default); these are
    # what Alembic needs at run time, including the non-Python template.
    folder = Path(migrations.__file__).parent
    assert (folder / "env.py").is_file()
    assert (folder / "script.py.mako").is_file()
    files = sorted(p.name.split("_", 1)[0] for p in (folder / "versions").glob("*.py"))
    script = ScriptDirectory.from_config(migrations.alembic_config(None, ""))
    assert files == sorted(s.revision for s in script.walk_revisions())  # one file each
    assert files[-1] == HEAD
