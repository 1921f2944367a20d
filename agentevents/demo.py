"""The article's scenario, end to end: pull requests flow through five cooperating agents.

::

    github        code.pull_request.opened
    code-review     code.review.completed            (score, APPROVE / REQUEST_CHANGES)
    deployer          code.deployment.started        (approved only)
    deployer            code.deployment.completed    -> monitoring: service.health.checked
                                                        -> notifier: notification.sent
                     or code.deployment.failed       -> monitoring: incident.created
                                                        -> notifier: notification.sent (page)
                                                     -> deployer: code.deployment.rolled_back
                                                        -> monitoring: incident.resolved
                                                           -> notifier: notification.sent
    notifier        notification.sent                (changes requested)

No agent calls another: each reacts to events and emits new ones. The ``audit`` agent
subscribes to every event (``>``) and appends it to the event store, one stream per
workflow, so the history is read back from the store afterwards: per workflow (query by
correlation id) and per agent (query by source, the "agent timeline").

Everything is deterministic: which PR fails is decided by its data (a migration that drops
a column still in use), not by chance. Run it with ``agentevents demo`` or::

    result = await run_demo()                      # memory bus, SQLite file in a temp dir
    result = await run_demo("redis://localhost:6379", "postgresql+asyncpg://...")
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agentevents.agents import AuditAgent, EventDrivenAgent, handles
from agentevents.core.event import Event, new_event_id, utcnow
from agentevents.core.schema import schemas
from agentevents.core.store import EventQuery
from agentevents.core.urls import redact_url
from agentevents.plugins.registry import create_bus, create_store

if TYPE_CHECKING:
    from datetime import datetime
    from uuid import UUID

    from agentevents.core.bus import Bus
    from agentevents.core.store import EventStore, RecordedEvent

__all__ = [
    "PULL_REQUESTS",
    "CodeReviewAgent",
    "DemoResult",
    "DeploymentAgent",
    "MonitoringAgent",
    "NotificationAgent",
    "RepositoryAgent",
    "WorkflowResult",
    "run_demo",
]

# -- payloads ----------------------------------------------------------------------------------


@schemas.payload("code.pull_request.opened")
class PullRequestOpened(BaseModel):
    pr_id: int
    repository: str
    service: str
    version: str
    title: str
    author: str
    files: list[str]


@schemas.payload("code.review.completed")
class ReviewCompleted(BaseModel):
    pr_id: int
    service: str
    version: str
    author: str
    score: int
    issues: list[str]
    recommendation: Literal["APPROVE", "REQUEST_CHANGES"]
    migrations: list[str]


@schemas.payload("code.deployment.started")
class DeploymentStarted(BaseModel):
    deployment_id: str
    pr_id: int
    service: str
    version: str
    previous_version: str
    environment: str
    migrations: list[str]


@schemas.payload("code.deployment.completed")
class DeploymentCompleted(BaseModel):
    deployment_id: str
    pr_id: int
    service: str
    version: str
    environment: str
    duration_seconds: float


@schemas.payload("code.deployment.failed")
class DeploymentFailed(BaseModel):
    deployment_id: str
    pr_id: int
    service: str
    version: str
    previous_version: str
    environment: str
    error: str
    rollback_required: bool


@schemas.payload("code.deployment.rolled_back")
class DeploymentRolledBack(BaseModel):
    deployment_id: str
    pr_id: int
    service: str
    restored_version: str
    environment: str


@schemas.payload("service.health.checked")
class HealthChecked(BaseModel):
    service: str
    version: str
    pr_id: int
    status: Literal["healthy", "degraded"]
    error_rate_percent: float


@schemas.payload("incident.created")
class IncidentCreated(BaseModel):
    incident_id: str
    service: str
    pr_id: int
    severity: Literal["low", "high", "critical"]
    summary: str


@schemas.payload("incident.resolved")
class IncidentResolved(BaseModel):
    incident_id: str
    service: str
    pr_id: int
    resolution: str


@schemas.payload("notification.sent")
class NotificationSent(BaseModel):
    channel: str
    message: str
    pr_id: int
    #: ``deployed``, ``rolled_back`` and ``changes_requested`` end a workflow.
    kind: Literal["deployed", "incident", "rolled_back", "changes_requested"]


FINAL_NOTIFICATIONS = {
    "deployed": "deployed",
    "rolled_back": "rolled back",
    "changes_requested": "changes requested",
}

#: The pull requests the demo opens: one ships, one fails and is rolled back, one is sent back.
PULL_REQUESTS = (
    PullRequestOpened(
        pr_id=101, repository="acme/platform", service="user-service", version="2.2.0",
        title="Add rate limiting to the login endpoint", author="ada",
        files=["src/users/ratelimit.py", "src/users/api.py", "tests/test_ratelimit.py"],
    ),
    PullRequestOpened(
        pr_id=102, repository="acme/platform", service="billing-service", version="3.0.0",
        title="Drop the legacy customer id", author="grace",
        files=["migrations/0042_drop_legacy_customer_id.sql", "src/billing/invoices.py",
               "tests/test_invoices.py"],
    ),
    PullRequestOpened(
        pr_id=103, repository="acme/platform", service="auth-service", version="1.9.0",
        title="WIP: rewrite session handling", author="linus",
        files=["src/auth/session.py"],
    ),
)  # fmt: skip

# -- agents ------------------------------------------------------------------------------------


class RepositoryAgent(EventDrivenAgent):
    """Stands for the code host: opens pull requests (it handles nothing)."""

    capabilities = ("pull_requests",)

    async def open_pull_request(self, pr: PullRequestOpened, event_id: UUID | None = None) -> Event:
        """Emit ``code.pull_request.opened``: the root of one workflow.

        Its id (``event_id``, default a new one) is the workflow's correlation id.
        """
        return await self.emit(pr, key=f"pr-{pr.pr_id}", id=event_id or new_event_id())


class CodeReviewAgent(EventDrivenAgent):
    """Reviews every opened pull request with a few deterministic rules."""

    capabilities = ("code_review", "security_scan", "best_practices_check")

    def __init__(self, bus: Bus, agent_id: str = "code-review", *, delay: float = 0.0) -> None:
        super().__init__(bus, agent_id)
        self.delay = delay

    @handles("code.pull_request.opened")
    async def review(self, pr: PullRequestOpened, event: Event) -> None:
        await asyncio.sleep(self.delay)
        issues: list[str] = []
        score = 100
        if not any(f.startswith("tests/") for f in pr.files):
            issues.append("no tests changed")
            score -= 25
        if pr.title.startswith("WIP"):
            issues.append("marked work in progress")
            score -= 30
        migrations = [Path(f).name for f in pr.files if f.startswith("migrations/")]
        for name in migrations:
            issues.append(f"database migration {name}")
            score -= 10
        await self.emit(
            ReviewCompleted(
                pr_id=pr.pr_id, service=pr.service, version=pr.version, author=pr.author,
                score=score, issues=issues, migrations=migrations,
                recommendation="APPROVE" if score >= 70 else "REQUEST_CHANGES",
            ),
            key=event.key,
        )


class DeploymentError(Exception):
    """The simulated rollout failed."""


class DeploymentAgent(EventDrivenAgent):
    """Deploys approved changes, one deployment per service at a time; rolls back failures."""

    capabilities = ("deployment", "rollback", "health_check")

    def __init__(self, bus: Bus, agent_id: str = "deployer", *, delay: float = 0.0) -> None:
        super().__init__(bus, agent_id)
        self.delay = delay
        #: What runs in production now, per service.
        self.deployed = {"user-service": "2.1.4", "billing-service": "2.9.1",
                         "auth-service": "1.8.0"}

    @handles("code.review.completed")
    async def consider(self, review: ReviewCompleted) -> None:
        if review.recommendation != "APPROVE":
            return
        await self.emit(
            DeploymentStarted(
                deployment_id=f"deploy-{review.pr_id}", pr_id=review.pr_id,
                service=review.service, version=review.version,
                previous_version=self.deployed.get(review.service, "0.0.0"),
                environment="production", migrations=review.migrations,
            ),
            key=review.service,  # deployments of one service run one at a time, in order
        )

    @handles("code.deployment.started")
    async def deploy(self, started: DeploymentStarted) -> None:
        began = time.monotonic()
        try:
            await self._roll_out(started)
        except DeploymentError as exc:
            await self.emit(
                DeploymentFailed(
                    deployment_id=started.deployment_id, pr_id=started.pr_id,
                    service=started.service, version=started.version,
                    previous_version=started.previous_version,
                    environment=started.environment, error=str(exc), rollback_required=True,
                ),
                key=started.service,
            )
            return
        self.deployed[started.service] = started.version
        await self.emit(
            DeploymentCompleted(
                deployment_id=started.deployment_id, pr_id=started.pr_id,
                service=started.service, version=started.version,
                environment=started.environment,
                duration_seconds=round(time.monotonic() - began, 3),
            ),
            key=started.service,
        )

    async def _roll_out(self, started: DeploymentStarted) -> None:
        await asyncio.sleep(self.delay)
        for migration in started.migrations:
            if "drop" in migration:
                raise DeploymentError(
                    f"migration {migration} failed: column still read by "
                    f"{started.service} {started.previous_version}"
                )

    @handles("code.deployment.failed")
    async def roll_back(self, failed: DeploymentFailed) -> None:
        if not failed.rollback_required:
            return
        await asyncio.sleep(self.delay)
        self.deployed[failed.service] = failed.previous_version
        await self.emit(
            DeploymentRolledBack(
                deployment_id=failed.deployment_id, pr_id=failed.pr_id,
                service=failed.service, restored_version=failed.previous_version,
                environment=failed.environment,
            ),
            key=failed.service,
        )


class MonitoringAgent(EventDrivenAgent):
    """Checks service health after deployments; opens and resolves incidents."""

    capabilities = ("metrics", "health_check", "incident_management")

    @handles("code.deployment.completed")
    async def check_health(self, done: DeploymentCompleted) -> None:
        await self.emit(
            HealthChecked(service=done.service, version=done.version, pr_id=done.pr_id,
                          status="healthy", error_rate_percent=0.2)
        )

    @handles("code.deployment.failed")
    async def open_incident(self, failed: DeploymentFailed) -> None:
        await self.emit(
            IncidentCreated(
                incident_id=f"INC-{failed.deployment_id}", service=failed.service,
                pr_id=failed.pr_id, severity="high",
                summary=f"{failed.service} {failed.version} failed to deploy",
            )
        )

    @handles("code.deployment.rolled_back")
    async def resolve_incident(self, rolled_back: DeploymentRolledBack) -> None:
        await self.emit(
            IncidentResolved(
                incident_id=f"INC-{rolled_back.deployment_id}", service=rolled_back.service,
                pr_id=rolled_back.pr_id,
                resolution=f"rolled back to {rolled_back.restored_version}, error rate normal",
            )
        )


class NotificationAgent(EventDrivenAgent):
    """Tells people: deployments that went live, incidents, reviews that need changes."""

    capabilities = ("slack", "email", "pagerduty")

    async def notify(self, channel: str, message: str, pr_id: int,
                     kind: Literal["deployed", "incident", "rolled_back",
                                   "changes_requested"]) -> None:
        await self.emit(NotificationSent(channel=channel, message=message, pr_id=pr_id,
                                         kind=kind))

    @handles("service.health.checked")
    async def on_healthy(self, check: HealthChecked) -> None:
        if check.status == "healthy":
            await self.notify("#deployments", f"{check.service} {check.version} is live",
                              check.pr_id, "deployed")

    @handles("incident.created")
    async def on_incident(self, incident: IncidentCreated) -> None:
        await self.notify("pagerduty", f"{incident.incident_id}: {incident.summary}",
                          incident.pr_id, "incident")

    @handles("incident.resolved")
    async def on_resolved(self, resolved: IncidentResolved) -> None:
        await self.notify("#incidents", f"{resolved.incident_id} resolved: "
                          f"{resolved.resolution}", resolved.pr_id, "rolled_back")

    @handles("code.review.completed")
    async def on_review(self, review: ReviewCompleted) -> None:
        if review.recommendation == "REQUEST_CHANGES":
            await self.notify(f"@{review.author}", f"PR #{review.pr_id}: changes requested "
                              f"(score {review.score}: {', '.join(review.issues)})",
                              review.pr_id, "changes_requested")


# -- results -----------------------------------------------------------------------------------


@dataclass(slots=True)
class WorkflowResult:
    """One pull request's workflow."""

    pr_id: int
    title: str
    correlation_id: str
    #: ``deployed``, ``rolled back``, ``changes requested``; ``None`` if it did not finish.
    outcome: str | None = None
    #: Event types in the order the demo's observer saw them.
    events: list[str] = field(default_factory=list)
    #: Event types read back from the store (query by correlation id), in store order.
    recorded: list[str] = field(default_factory=list)


@dataclass(slots=True)
class DemoResult:
    """What :func:`run_demo` did; URLs are redacted."""

    bus_url: str
    store_url: str
    completed: bool
    workflows: list[WorkflowResult]
    #: The deployer's events read back from the store (query by source), in order.
    agent_timeline: list[str]
    events_seen: int
    events_recorded: int
    dead_letters: int
    seconds: float


# -- the run -----------------------------------------------------------------------------------


class _Observer:
    """Prints the flow as it happens and notices when every workflow has finished."""

    def __init__(self, console: Console, workflows: dict[str, WorkflowResult]) -> None:
        self.console = console
        self.workflows = workflows
        self.seen: list[Event] = []
        self.depth: dict[str, int] = {}
        self.finished = asyncio.Event()
        self.changed = asyncio.Event()

    async def stopped(self, instances: set[str]) -> None:
        """Return once ``agent.stopped`` of every agent instance in ``instances`` was seen."""
        while not instances <= {str(e.payload.get("instance_id")) for e in self.seen
                                if e.type == "agent.stopped"}:
            self.changed.clear()
            await self.changed.wait()

    async def __call__(self, event: Event) -> None:
        self.seen.append(event)
        self.changed.set()
        depth = self.depth.get(event.causation_id or "", -1) + 1
        self.depth[str(event.id)] = depth
        self.console.print(_flow_line(event, depth), no_wrap=True, overflow="ellipsis")
        workflow = self.workflows.get(event.correlation_id or "")
        if workflow is None:
            return
        workflow.events.append(event.type)
        if event.type == "notification.sent":
            outcome = FINAL_NOTIFICATIONS.get(str(event.payload.get("kind")))
            if outcome is not None:
                workflow.outcome = outcome
        if self.workflows and all(w.outcome is not None for w in self.workflows.values()):
            self.finished.set()


async def run_demo(
    bus_url: str | None = None,
    store_url: str | None = None,
    *,
    console: Console | None = None,
    timeout: float = 30.0,
    delay: float = 0.05,
) -> DemoResult:
    """Run the scenario and return what happened; it ends on its own within ``timeout``.

    ``bus_url`` defaults to a fresh, private in-memory broker (``memory://demo-<id>``),
    ``store_url`` to a SQLite file in a temporary directory removed afterwards. ``delay``
    is the simulated work time of reviews, rollouts and rollbacks, in seconds.
    """
    console = console or Console()
    async with contextlib.AsyncExitStack() as cleanup:
        if store_url is None:
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="agentevents-"))
            store_url = f"sqlite+aiosqlite:///{Path(folder) / 'agentevents-demo.db'}"
        bus_url = bus_url or f"memory://demo-{uuid.uuid4().hex[:8]}"
        bus = create_bus(bus_url)
        cleanup.push_async_callback(bus.close)
        store = create_store(store_url)
        cleanup.push_async_callback(store.close)
        return await _run(bus, store, bus_url, store_url, console, timeout, delay)
    raise AssertionError("unreachable")  # pragma: no cover - for type checkers


async def _run(
    bus: Bus, store: EventStore, bus_url: str, store_url: str, console: Console,
    timeout: float, delay: float,
) -> DemoResult:
    began = time.monotonic()
    since = utcnow()
    console.rule("[bold]agentevents demo: event-driven agents")
    console.print(Text.assemble("bus   ", (redact_url(bus_url), "cyan"), "\nstore ",
                                (redact_url(store_url), "cyan"), "\n"))
    create_schema = getattr(store, "create_schema", None)  # servers need their tables once
    if create_schema is not None:
        await create_schema()

    workflows: dict[str, WorkflowResult] = {}
    observer = _Observer(console, workflows)
    watching = await bus.subscribe(">", observer, max_in_flight=1)
    audit = AuditAgent(bus, store, "audit")
    github = RepositoryAgent(bus, "github")
    agents: list[EventDrivenAgent] = [
        CodeReviewAgent(bus, delay=delay),
        DeploymentAgent(bus, delay=delay),
        MonitoringAgent(bus, "monitoring"),
        NotificationAgent(bus, "notifier"),
        github,
    ]
    await audit.start()
    for agent in agents:
        await agent.start()

    # Know every workflow before its first event can reach the observer.
    ids = {pr.pr_id: new_event_id() for pr in PULL_REQUESTS}
    for pr in PULL_REQUESTS:
        workflows[str(ids[pr.pr_id])] = WorkflowResult(pr.pr_id, pr.title, str(ids[pr.pr_id]))
    for pr in PULL_REQUESTS:
        await github.open_pull_request(pr, ids[pr.pr_id])
    completed = True
    try:
        await asyncio.wait_for(observer.finished.wait(), timeout)
        await _until_recorded(store, observer.seen, since, timeout)
    except TimeoutError:
        completed = False
        console.print(f"[bold red]the workflows did not finish within {timeout:g} s[/]")

    for agent in agents:
        await agent.stop()
    if completed:  # let the audit agent record the agent.stopped events too
        instances = {agent.instance_id for agent in agents}
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(observer.stopped(instances), timeout)
            await _until_recorded(store, observer.seen, since, timeout)
    await audit.stop()
    await watching.stop()
    dead = await bus.dead_letters()

    labels = {w.correlation_id: f"PR #{w.pr_id}" for w in workflows.values()}
    for workflow in workflows.values():
        records = await store.query(EventQuery(correlation_id=workflow.correlation_id,
                                               limit=None))
        workflow.recorded = [r.event.type for r in records]
        console.print()
        console.print(_timeline(f"Audit trail of PR #{workflow.pr_id}, \"{workflow.title}\" "
                                f"(stream workflow-{workflow.correlation_id})", records))
    timeline = await store.query(EventQuery(source="deployer", since=since, limit=None))
    console.print()
    console.print(_timeline("Agent timeline of 'deployer' (query by source)", timeline, labels))
    recorded = await store.query(EventQuery(since=since, limit=None))

    result = DemoResult(
        bus_url=redact_url(bus_url), store_url=redact_url(store_url), completed=completed,
        workflows=list(workflows.values()), agent_timeline=[r.event.type for r in timeline],
        events_seen=len(observer.seen), events_recorded=len(recorded),
        dead_letters=len(dead), seconds=round(time.monotonic() - began, 3),
    )
    console.print()
    console.print(_summary(result))
    return result


async def _until_recorded(
    store: EventStore, events: list[Event], since: datetime, timeout: float
) -> None:
    """Wait until every event in ``events`` (which may still grow) is in the store."""
    deadline = time.monotonic() + timeout
    while True:
        stored = {r.event.id for r in await store.query(EventQuery(since=since, limit=None))}
        if all(event.id in stored for event in events):
            return
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.02)


# -- rendering ---------------------------------------------------------------------------------


def summarize(event: Event) -> str:
    """The key payload fields of a demo or lifecycle event, in one line."""
    p: dict[str, Any] = event.payload
    try:
        match event.type:
            case "code.pull_request.opened":
                return (f"PR #{p['pr_id']} {p['service']} {p['version']} \"{p['title']}\" "
                        f"by {p['author']}")
            case "code.review.completed":
                issues = f" ({'; '.join(p['issues'])})" if p["issues"] else ""
                return f"PR #{p['pr_id']} score {p['score']} -> {p['recommendation']}{issues}"
            case "code.deployment.started":
                return f"{p['service']} {p['previous_version']} -> {p['version']} " \
                       f"({p['environment']})"
            case "code.deployment.completed":
                return f"{p['service']} {p['version']} live after {p['duration_seconds']:g} s"
            case "code.deployment.failed":
                return f"{p['service']} {p['version']}: {p['error']}"
            case "code.deployment.rolled_back":
                return f"{p['service']} back on {p['restored_version']}"
            case "service.health.checked":
                return f"{p['service']} {p['version']} {p['status']}, " \
                       f"error rate {p['error_rate_percent']}%"
            case "incident.created":
                return f"{p['incident_id']} [{p['severity']}] {p['summary']}"
            case "incident.resolved":
                return f"{p['incident_id']}: {p['resolution']}"
            case "notification.sent":
                return f"{p['channel']}: {p['message']}"
            case "agent.started":
                return f"capabilities: {', '.join(p['capabilities']) or '-'}"
            case "agent.failed":
                return f"{p['phase']}: {p['error_type']}: {p['error']}"
    except (KeyError, TypeError):
        pass
    text = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("agent_id", "instance_id"))
    return text[:80]


def _style(event_type: str) -> str:
    if event_type.endswith(".failed") or event_type == "incident.created":
        return "bold red"
    if event_type.endswith((".completed", ".resolved", ".rolled_back")):
        return "green"
    if event_type.startswith("agent."):
        return "yellow"
    return "cyan"


def _clock(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S.%f")[:-3]


def _flow_line(event: Event, depth: int) -> Text:
    return Text.assemble(
        (_clock(event.time), "dim"), "  ",
        (f"{event.source:<11}", "magenta"), " ",
        ("  " * depth + ("└ " if depth else ""), "dim"),
        (event.type, _style(event.type)), "  ",
        (summarize(event), "dim"),
    )


def _timeline(
    title: str, records: list[RecordedEvent], labels: dict[str, str] | None = None
) -> Table:
    """A table of recorded events; ``labels`` adds a workflow column (correlation -> name)."""
    table = Table(title=Text(title, "italic"), title_justify="left")
    table.add_column("pos", justify="right")
    if labels is not None:
        table.add_column("workflow")
    table.add_column("ver", justify="right")
    table.add_column("time")
    table.add_column("source", style="magenta")
    table.add_column("type")
    table.add_column("details", overflow="fold")
    for record in records:
        event = record.event
        cells: list[str | Text] = [str(record.position)]
        if labels is not None:
            cells.append(labels.get(event.correlation_id or "", "-"))
        cells += [str(record.version), _clock(event.time), event.source,
                  Text(event.type, _style(event.type)), Text(summarize(event))]
        table.add_row(*cells)
    return table


def _summary(result: DemoResult) -> Table:
    table = Table(title="Summary", title_justify="left")
    table.add_column("PR", justify="right")
    table.add_column("title")
    table.add_column("outcome")
    table.add_column("events", justify="right")
    table.add_column("in store", justify="right")
    for workflow in result.workflows:
        outcome = workflow.outcome or "unfinished"
        style = {"deployed": "green", "rolled back": "red", "changes requested": "yellow"}
        table.add_row(f"#{workflow.pr_id}", Text(workflow.title),
                      Text(outcome, style.get(outcome, "bold red")),
                      str(len(workflow.events)), str(len(workflow.recorded)))
    table.caption = (
        f"{result.events_seen} events seen on the bus, {result.events_recorded} recorded by "
        f"the audit agent, {result.dead_letters} dead letters, {result.seconds:g} s"
    )
    return table
