"""The ``agentevents`` command: the demo, the discovered backends, the conformance suite.

::

    agentevents demo [--bus URL] [--store URL]
    agentevents backends
    agentevents conformance --bus URL --store URL [-k EXPR] [-x] [-v]
    agentevents schema upgrade|current|enable-outbox|drop [--store URL]
    agentevents relay --store URL --bus URL [--batch-size N] [--name NAME] [--lease-ttl S]
    agentevents version

URLs are shown redacted. Errors of agentevents (bad URL, unknown scheme, missing extra) are
printed as one message, exit code 2, without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agentevents import __version__
from agentevents.core.errors import AgentEventsError
from agentevents.core.urls import redact_url
from agentevents.plugins.registry import registry

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pytest

    from agentevents.stores.sql.store import SqlEventStore

__all__ = ["app", "main"]

app = typer.Typer(
    name="agentevents",
    help="Event-driven coordination for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold URLs with passwords
)

SUITE = "agentevents.conformance_tests"
SUITE_PLUGIN = "agentevents.conformance_tests.plugin"


def _fail(message: str, code: int = 2) -> NoReturn:
    Console(stderr=True).print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Print an :class:`AgentEventsError` as one line and exit 2 (no traceback)."""
    try:
        yield
    except AgentEventsError as exc:
        _fail(str(exc))


# -- demo ------------------------------------------------------------------------------------


@app.command()
def demo(
    bus: Annotated[
        str | None, typer.Option(help="Bus URL. [default: a private in-memory broker]")
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(help="Store URL. [default: a SQLite file in a temporary directory]"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 30.0,
) -> None:
    """Run the article's scenario: PRs reviewed, deployed, one failing and rolled back."""
    from agentevents.demo import run_demo

    with _clean_errors():
        result = asyncio.run(run_demo(bus, store, console=Console(), timeout=timeout))
    if not result.completed:
        raise typer.Exit(1)


# -- backends --------------------------------------------------------------------------------


@app.command()
def backends() -> None:
    """List the bus and store backends discovered through the plugin entry points."""
    with _clean_errors():
        found = sorted(registry.backends(), key=lambda info: (info.kind, info.name))
        table = Table(title="agentevents backends", title_justify="left")
        for column in ("name", "kind", "schemes", "plugin", "installed", "to install"):
            table.add_column(column)
        for info in found:
            if info.installed:
                installed, hint = Text("yes", "green"), ""
            else:
                missing = info.missing()
                installed = Text("no", "red")
                hint = (f"pip install 'agentevents[{info.extra}]'" if info.extra
                        else f"pip install {' '.join(missing)}")
            table.add_row(Text(info.name), info.kind, Text(", ".join(info.schemes)),
                          Text(registry.plugin_of(info)), installed, Text(hint))
    console = Console()
    console.print(table)
    for name, error in sorted(registry.broken.items()):
        console.print(Text.assemble(("broken plugin ", "bold red"), (name, "bold"),
                                    f" (skipped): {error}"))


# -- conformance -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    nodeid: str
    outcome: str = "passed"
    reason: str = ""
    duration: float = 0.0


@dataclass(slots=True)
class _Collector:
    """A pytest plugin object collecting one outcome per test (and collection errors)."""

    results: dict[str, _Outcome] = field(default_factory=dict)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = self.results.setdefault(report.nodeid, _Outcome(report.nodeid))
        row.duration += report.duration
        if report.skipped:
            if hasattr(report, "wasxfail"):
                row.outcome, row.reason = "xfailed", str(report.wasxfail)
            else:
                row.outcome, row.reason = "skipped", _skip_reason(report)
        elif report.failed:
            row.outcome = "failed" if report.when == "call" else "error"
            row.reason = _failure_reason(report)
        elif report.when == "call" and hasattr(report, "wasxfail"):
            row.outcome = "xpassed"

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.results[report.nodeid] = _Outcome(
                report.nodeid or SUITE, "error", _failure_reason(report)
            )


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _failure_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if message:
        return str(message).splitlines()[0]
    lines = [line for line in report.longreprtext.splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def _pytest_args(
    bus: str | None, store: str | None, keyword: str | None, exitfirst: bool, verbose: bool,
    inifile: Path,
) -> list[str]:
    args = ["--pyargs", SUITE, "-c", str(inifile), "--rootdir", str(inifile.parent),
            "-p", "no:cacheprovider", "--tb=short"]
    autoload = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    installed = {ep.value for ep in entry_points(group="pytest11")}
    if not autoload or SUITE_PLUGIN not in installed:
        args += ["-p", SUITE_PLUGIN]
    if not autoload:
        args += ["-p", "pytest_asyncio.plugin"]
    if bus:
        args += ["--bus-url", bus]
    if store:
        args += ["--store-url", store]
    if keyword:
        args += ["-k", keyword]
    if exitfirst:
        args.append("-x")
    args.append("-v" if verbose else "-q")
    return args


#: The suite's own pytest configuration: the caller's project settings must not change it.
_INI = """\
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
# The CLI has imported agentevents already; the suite's own modules are still rewritten.
filterwarnings =
    ignore:Module already imported:pytest.PytestAssertRewriteWarning
"""

_STYLES = {"passed": "green", "failed": "bold red", "error": "bold red", "skipped": "yellow",
           "xfailed": "yellow", "xpassed": "bold red"}


@app.command()
def conformance(
    bus: Annotated[str | None, typer.Option(help="Bus URL to test.")] = None,
    store: Annotated[str | None, typer.Option(help="Store URL to test.")] = None,
    keyword: Annotated[
        str | None, typer.Option("-k", help="Only tests matching this pytest -k expression.")
    ] = None,
    exitfirst: Annotated[
        bool, typer.Option("-x", "--exitfirst", help="Stop at the first failure.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Show pytest's verbose output.")
    ] = False,
) -> None:
    """Run the shipped conformance suite against a bus and/or store URL."""
    if not bus and not store:
        _fail("give a --bus URL, a --store URL, or both")
    for module in ("pytest", "pytest_asyncio"):
        if importlib.util.find_spec(module) is None:
            _fail(f"the conformance suite needs {module}, which is not installed; "
                  "install it with: pip install 'agentevents[test]'")
    with _clean_errors():
        if bus:
            registry.lookup(bus, "bus")
        if store:
            registry.lookup(store, "store")
    import pytest

    console = Console()
    shown = [f"bus {redact_url(bus)}" if bus else "", f"store {redact_url(store)}" if store else ""]
    console.rule(Text(f"conformance: {', '.join(s for s in shown if s)}"))
    collector = _Collector()
    with tempfile.TemporaryDirectory(prefix="agentevents-conformance-") as folder:
        inifile = Path(folder) / "pytest.ini"
        inifile.write_text(_INI)
        args = _pytest_args(bus, store, keyword, exitfirst, verbose, inifile)
        code = pytest.main(args, plugins=[collector])
    rows = list(collector.results.values())
    console.print(_results_table(rows))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    console.print(", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
                  or "no tests ran")
    if code == pytest.ExitCode.NO_TESTS_COLLECTED or not rows:
        _fail("no conformance test was selected", 1)
    if code != pytest.ExitCode.OK or any(r.outcome in ("failed", "error", "xpassed")
                                         for r in rows):
        raise typer.Exit(1 if code in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) else 2)


def _results_table(rows: list[_Outcome]) -> Table:
    table = Table(title="conformance results", title_justify="left")
    table.add_column("test", overflow="fold")
    table.add_column("outcome")
    table.add_column("time", justify="right")
    table.add_column("reason", overflow="fold")
    for row in rows:
        name = row.nodeid.split("conformance_tests/", 1)[-1]
        table.add_row(Text(name), Text(row.outcome, _STYLES.get(row.outcome, "")),
                      f"{row.duration:.2f}s", Text(row.reason))
    return table


# -- schema ----------------------------------------------------------------------------------

schema_app = typer.Typer(
    name="schema",
    help="Create, upgrade, inspect or drop a SQL store's tables (versioned migrations).",
    no_args_is_help=True,
)
app.add_typer(schema_app)

_SchemaStore = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="SQL store URL; ?table_prefix= picks the tables. "
             "[default: AGENTEVENTS_STORE_URL, then store_url in the config files]",
    ),
]


def _sql_store(url: str | None) -> tuple[SqlEventStore, str]:
    """The SQL store of ``url`` (or the configured one), and its URL for display."""
    from agentevents.core.errors import ConfigurationError
    from agentevents.core.settings import load_settings
    from agentevents.stores.sql.store import SqlEventStore

    resolved = url or load_settings().store_url
    info = registry.lookup(resolved, "store")
    store = info.factory(resolved)
    if not isinstance(store, SqlEventStore):
        asyncio.run(store.close())
        raise ConfigurationError(
            f"{redact_url(resolved)!r} is not a SQL store URL: schema commands manage the "
            "tables of SQLite, PostgreSQL and MySQL/MariaDB stores"
        )
    return store, redact_url(resolved)


def _no_sqlite_file(url: str | None) -> bool:
    """Whether ``url`` names a SQLite file that does not exist (so there is nothing to read
    or drop, and connecting would create it)."""
    from sqlalchemy.engine import make_url

    from agentevents.core.settings import load_settings

    with contextlib.suppress(Exception):  # not a URL SQLAlchemy reads: the store will say
        parsed = make_url(url or load_settings().store_url)
        database = parsed.database or ""
        return (parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
                and not database.startswith("file:") and not Path(database).exists())
    return False


def _revision_text(revision: str | None, head: str) -> Text:
    if revision is None:
        return Text("none", "yellow")
    return Text(revision, "green" if revision == head else "yellow")


async def _schema_upgrade(store: SqlEventStore) -> tuple[str | None, str | None]:
    try:
        before = await store.schema_revision()
        await store.create_schema()
        return before, await store.schema_revision()
    finally:
        await store.close()


async def _schema_current(store: SqlEventStore, head: str) -> tuple[str | None, bool]:
    """The revision, and whether the outbox is on (only read at the head revision)."""
    try:
        revision = await store.schema_revision()
        return revision, revision == head and await store.outbox_in_tables()
    finally:
        await store.close()


async def _schema_enable_outbox(store: SqlEventStore, head: str) -> bool:
    """Enable the outbox; whether it was on already."""
    try:
        was_on = await store.schema_revision() == head and await store.outbox_in_tables()
        await store.enable_outbox()
        return was_on
    finally:
        await store.close()


_OUTBOX_ON = ("outbox: on; every append to these tables is recorded for the relay, whatever "
              "the URL of the store that appends")


async def _schema_drop(store: SqlEventStore) -> None:
    try:
        await store.drop_schema()
    finally:
        await store.close()


@schema_app.command("upgrade")
def schema_upgrade(store: _SchemaStore = None) -> None:
    """Create the store's tables, or upgrade them to the newest revision (idempotent).

    Safe to run from several processes at once. Tables from before versioned migrations are
    stamped with the revision they match, then upgraded.
    """
    from agentevents.stores.sql.migrations import head_revision

    with _clean_errors():
        sql, shown = _sql_store(store)
        before, after = asyncio.run(_schema_upgrade(sql))
    head = head_revision()
    message = Text.assemble(f"schema of {shown} (tables {sql.table_prefix}*): ",
                            _revision_text(before, head))
    if before == after:
        message.append(" (head), nothing to do")
    else:
        message.append_text(Text.assemble(" -> ", _revision_text(after, head), " (head)"))
    Console().print(message)
    if sql.outbox_enabled:  # asked for with ?outbox=true: create_schema() enabled it
        Console().print(Text(_OUTBOX_ON))


@schema_app.command("current")
def schema_current(
    store: _SchemaStore = None,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 unless the schema is at the head revision.")
    ] = False,
) -> None:
    """Print the schema revision of the store's tables, and the newest one known."""
    from agentevents.stores.sql.migrations import head_revision

    head = head_revision()
    with _clean_errors():
        sql, shown = _sql_store(store)
        if _no_sqlite_file(store):
            asyncio.run(sql.close())
            revision, outbox = None, False
        else:
            revision, outbox = asyncio.run(_schema_current(sql, head))
    message = Text.assemble(f"schema of {shown} (tables {sql.table_prefix}*): ",
                            _revision_text(revision, head))
    if revision == head:
        message.append(" (head), outbox on" if outbox else " (head)")
    elif revision is None:
        message.append(" (no versioned tables; `agentevents schema upgrade` creates them, "
                       f"or stamps tables from before migrations; head is {head})")
    else:
        message.append(f" (head is {head}; run `agentevents schema upgrade`)")
    Console().print(message)
    if check and revision != head:
        raise typer.Exit(1)


@schema_app.command("enable-outbox")
def schema_enable_outbox(store: _SchemaStore = None) -> None:
    """Enable the transactional outbox of the store's tables (idempotent).

    From then on every append to these tables, by any process and whatever its store URL,
    records its events for the relay (`agentevents relay`) in the append's transaction.
    Events appended before are not relayed. The tables must be at the newest revision
    (`agentevents schema upgrade`). Returns once every running store has seen the
    setting (about a second).
    """
    from agentevents.stores.sql.migrations import head_revision

    with _clean_errors():
        sql, shown = _sql_store(store)
        was_on = asyncio.run(_schema_enable_outbox(sql, head_revision()))
    prefix = f"outbox of {shown} (tables {sql.table_prefix}*): "
    Console().print(Text(prefix + ("already on" if was_on else
                                   "on; every append to these tables is recorded for the "
                                   "relay from now on, whatever the URL of the store that "
                                   "appends")))


@schema_app.command("drop")
def schema_drop(
    store: _SchemaStore = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Drop the store's tables (those of its table prefix) and every event in them."""
    with _clean_errors():
        sql, shown = _sql_store(store)
        if not yes and not typer.confirm(
            f"Drop the tables {sql.table_prefix}* at {shown} and every event in them?"
        ):
            asyncio.run(sql.close())
            _fail("not dropped", 1)
        if _no_sqlite_file(store):
            asyncio.run(sql.close())
        else:
            asyncio.run(_schema_drop(sql))
    Console().print(Text(f"dropped the tables {sql.table_prefix}* at {shown}"))


# -- relay -----------------------------------------------------------------------------------


@app.command()
def relay(
    store: Annotated[
        str | None,
        typer.Option(help="Store URL, with '?outbox=true'; a SQL store's tables must have "
                          "the outbox enabled (`agentevents schema enable-outbox`). "
                          "[default: AGENTEVENTS_STORE_URL, then the config file]"),
    ] = None,
    bus: Annotated[
        str | None,
        typer.Option(help="Bus URL to publish to. "
                          "[default: AGENTEVENTS_BUS_URL, then the config file]"),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Events published per batch (one broker round trip).")
    ] = 100,
    name: Annotated[
        str,
        typer.Option(help="Relay name: the relays of one store share one lease under it; one "
                          "publishes, the others stand by. Give every relay of an outbox "
                          "the same name: another name is refused. To feed several buses, "
                          "relay to one bus and bridge, or use a separate store or table "
                          "prefix per bus; to rename, delete the old lease row."),
    ] = "default",
    lease_ttl: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds the lease lasts unless renewed: how soon a "
                                   "standby takes over from a relay that died."),
    ] = 10.0,
) -> None:
    """Publish the events recorded in a store's outbox to a bus: in order, at least once.

    Runs until SIGINT or SIGTERM, which finish the batch in progress and release the lease
    (a second signal stops at once; the unfinished batch is published again later).
    """
    import logging
    import signal

    from agentevents.core.settings import load_settings
    from agentevents.relay import OutboxRelay, check_relay_names

    with _clean_errors():  # before connecting to anything
        check_relay_names(name)
    settings = load_settings()
    store_url = store or settings.store_url
    bus_url = bus or settings.bus_url
    console = Console(stderr=True)
    ours = logging.getLogger("agentevents")
    if not ours.handlers and not logging.getLogger().handlers:  # the relay's log, on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)

    async def serve() -> int:
        from agentevents.plugins.registry import create_bus, create_store

        event_store = create_store(store_url)
        try:
            event_bus = create_bus(bus_url)
            try:
                outbox_relay = OutboxRelay(event_store, event_bus, name=name,
                                           batch_size=batch_size, lease_ttl=lease_ttl)
                console.print(Text(
                    f"relay {name!r} ({outbox_relay.owner}): store {redact_url(store_url)} "
                    f"-> bus {redact_url(bus_url)}; batches of {batch_size}, lease "
                    f"{lease_ttl:g} s. Ctrl-C to stop."
                ))
                if bus_url.lower().startswith("memory:"):
                    console.print(Text(
                        "warning: a memory:// bus lives inside this relay process; no other "
                        "process sees what it publishes", "yellow"))
                task = asyncio.ensure_future(outbox_relay.run())
                signals = 0

                def on_signal() -> None:
                    nonlocal signals
                    signals += 1
                    if signals == 1:
                        console.print("stopping after the batch in progress "
                                      "(signal again to stop at once)")
                        outbox_relay.stop()
                    else:
                        task.cancel()

                loop = asyncio.get_running_loop()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError):  # not on Windows
                        loop.add_signal_handler(signum, on_signal)
                try:
                    await task
                except asyncio.CancelledError:
                    console.print(f"relay stopped at once after publishing "
                                  f"{outbox_relay.published} event(s)")
                    return 130
                console.print(f"relay stopped: published {outbox_relay.published} event(s)")
                return 0
            finally:
                await event_bus.close()
        finally:
            await event_store.close()

    with _clean_errors():
        code = asyncio.run(serve())
    if code:
        raise typer.Exit(code)


# -- version ---------------------------------------------------------------------------------


@app.command()
def version() -> None:
    """Print the installed agentevents version."""
    Console().print(f"agentevents {__version__}")


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``agentevents`` console script."""
    return app(args=argv)


if __name__ == "__main__":
    main()
