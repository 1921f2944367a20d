"""The demo: the article's scenario runs to the end, and the audit trail is in the store."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from agentevents import EventQuery, create_store
from agentevents.cli import app
from agentevents.demo import PULL_REQUESTS, run_demo

SUCCESS = [
    "code.pull_request.opened",
    "code.review.completed",
    "code.deployment.started",
    "code.deployment.completed",
    "service.health.checked",
    "notification.sent",
]
FAILURE_PATH = {
    "code.deployment.failed",
    "incident.created",
    "code.deployment.rolled_back",
    "incident.resolved",
}


@pytest.mark.asyncio
async def test_demo_runs_every_workflow_and_the_store_has_the_audit_trail(tmp_path: Path) -> None:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"
    output = io.StringIO()
    result = await run_demo(f"memory://demo-test-{uuid.uuid4().hex[:8]}", store_url,
                            console=Console(file=output, width=160), delay=0.01)

    assert result.completed
    assert result.dead_letters == 0
    # The audit agent recorded everything but its own agent.stopped (sent after it stopped).
    assert result.events_recorded == result.events_seen - 1
    by_pr = {w.pr_id: w for w in result.workflows}
    assert set(by_pr) == {pr.pr_id for pr in PULL_REQUESTS}

    shipped, failed, rejected = by_pr[101], by_pr[102], by_pr[103]
    assert shipped.outcome == "deployed"
    assert sorted(shipped.events) == sorted(SUCCESS)
    assert failed.outcome == "rolled back"
    assert set(failed.events) >= FAILURE_PATH
    assert "code.deployment.completed" not in failed.events
    assert failed.events.count("notification.sent") == 2  # the page, then the resolution
    assert rejected.outcome == "changes requested"
    assert "code.deployment.started" not in rejected.events

    # The audit trail, read back from the store file: every workflow event, causes first.
    store = create_store(store_url)
    try:
        for workflow in result.workflows:
            records = await store.query(EventQuery(correlation_id=workflow.correlation_id,
                                                   limit=None))
            assert sorted(r.event.type for r in records) == sorted(workflow.events)
            assert [r.event.type for r in records] == workflow.recorded
            assert [r.version for r in records] == list(range(1, len(records) + 1))
            assert {r.stream_id for r in records} == {f"workflow-{workflow.correlation_id}"}
            seen: set[str] = set()
            for record in records:
                event = record.event
                assert event.causation_id is None or event.causation_id in seen, event.type
                seen.add(str(event.id))
            assert records[0].event.type == "code.pull_request.opened"
            assert str(records[0].event.id) == workflow.correlation_id
    finally:
        await store.close()

    # The deployer's timeline, by source: its lifecycle around its deployments.
    timeline = result.agent_timeline
    assert timeline[0] == "agent.started"
    assert timeline[-1] == "agent.stopped"
    assert timeline.count("code.deployment.started") == 2
    assert {"code.deployment.completed", "code.deployment.failed",
            "code.deployment.rolled_back"} <= set(timeline)

    text = output.getvalue()
    for needle in ("code.deployment.rolled_back", "Audit trail of PR #102",
                   "Agent timeline of 'deployer'", "Summary", "rolled back"):
        assert needle in text


def test_cli_demo_exits_zero(tmp_path: Path) -> None:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    result = CliRunner().invoke(app, ["demo", "--store", store_url], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "changes requested" in result.output
    assert (tmp_path / "cli.db").exists()
