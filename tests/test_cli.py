"""The ``agentevents`` command line."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from agentevents import __version__
from agentevents.cli import app

WIDE = {"COLUMNS": "200"}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=WIDE)
    return result.exit_code, result.output


def test_version() -> None:
    assert invoke("version") == (0, f"agentevents {__version__}\n")


def test_backends_lists_the_memory_bus_as_installed() -> None:
    code, output = invoke("backends")
    assert code == 0
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines()
            if line.startswith("│")]
    memory = next(row for row in rows if row[:2] == ["memory", "bus"])
    assert memory[2] == "memory"  # schemes
    assert memory[4] == "yes"  # installed
    assert any(row[1] == "store" and "sqlite+aiosqlite" in row[2] for row in rows)


def test_unknown_scheme_is_a_clean_error_naming_the_installed_ones() -> None:
    for args in (("conformance", "--bus", "nope://somewhere"), ("demo", "--bus", "nope://x")):
        code, output = invoke(*args)
        assert code == 2, output
        assert "no bus backend handles the URL scheme 'nope'" in output
        assert "installed schemes: memory" in output
        assert "Traceback" not in output


def test_secrets_in_urls_are_never_printed() -> None:
    code, output = invoke("demo", "--store", "postgresql+asyncpg://app:hunter2@127.0.0.1:1/db")
    assert code == 2, output
    assert "app:***@127.0.0.1" in output
    assert "hunter2" not in output
    assert "Traceback" not in output


def test_conformance_needs_a_url() -> None:
    code, output = invoke("conformance")
    assert code == 2
    assert "--bus" in output


def _conformance(*args: str) -> subprocess.CompletedProcess[str]:
    # A separate process: the suite runs pytest in-process, which must not nest in this one.
    return subprocess.run(
        [sys.executable, "-m", "agentevents.cli", "conformance", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **WIDE},
    )


def test_conformance_runs_the_suite_and_prints_a_table() -> None:
    run = _conformance("--bus", "memory://", "--store", "memory://",
                       "-k", "round_trip or every_group_gets_every_event")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "conformance results" in run.stdout
    table = [line for line in run.stdout.splitlines() if line.startswith("│")]
    assert len(table) == 3
    assert all("passed" in line for line in table)
    assert any("test_store.py::" in line for line in table)


def test_conformance_that_selects_nothing_fails() -> None:
    run = _conformance("--bus", "memory://", "-k", "no_such_test_anywhere")
    assert run.returncode == 1
    assert "no conformance test was selected" in run.stderr
