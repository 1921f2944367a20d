"""EventDrivenAgent: handler declarations, typed payloads, emit, lifecycle, groups, audit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from pydantic import BaseModel

from agentevents import Bus, ConfigurationError, Event, SubscribeError, create_bus, create_store
from agentevents.agents import (
    DEFAULT_GROUP,
    AgentFailed,
    AgentStarted,
    AuditAgent,
    EventDrivenAgent,
    handles,
)
from agentevents.core.schema import schemas

# -- payload models (module level: typed handlers resolve annotations here) --------------------


@schemas.payload("test_agents.order.placed")
class OrderPlaced(BaseModel):
    order_id: str
    amount: int


@schemas.payload("test_agents.task.completed", version=1)
class TaskCompletedV1(BaseModel):
    task_id: str


@schemas.payload("test_agents.task.completed", version=2)
class TaskCompleted(BaseModel):
    task_id: str
    duration_s: float


@schemas.upcaster("test_agents.task.completed", from_version=1)
def _task_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "duration_s": 0.0}


# -- helpers -----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def bus() -> AsyncIterator[Bus]:
    """A bus on a private in-memory broker, with fast retries."""
    bus = create_bus(f"memory://agents-{uuid.uuid4().hex[:8]}", retry_backoff=0.01,
                     max_backoff=0.02)
    yield bus
    await bus.close()


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def record(bus: Bus, pattern: str) -> list[Event]:
    """Collect every event matching ``pattern`` from now on (ephemeral subscription)."""
    seen: list[Event] = []

    async def collect(event: Event) -> None:
        seen.append(event)

    await bus.subscribe(pattern, collect)
    return seen


class Recorder(EventDrivenAgent):
    """Remembers what its handlers received."""

    def __init__(self, bus: Bus, agent_id: str | None = None) -> None:
        super().__init__(bus, agent_id)
        self.received: list[Any] = []


# -- declaring handlers ------------------------------------------------------------------------


class Declared(Recorder):
    capabilities = ("sorting", "filing")

    @handles("a.b", "a.c.>")
    @handles("x.*", group="shared", max_attempts=2, start="earliest")
    async def first(self, event: Event) -> None:
        self.received.append(event)

    @handles("z.z", group=None)
    async def second(self, event: Event) -> None:
        self.received.append(event)

    async def not_a_handler(self, event: Event) -> None:
        raise AssertionError("never subscribed")


class DeclaredChild(Declared):
    @handles("child.event")
    async def third(self, event: Event) -> None:
        self.received.append(event)


def test_handles_collects_every_declaration_at_class_creation() -> None:
    specs = {(s.method, s.patterns): s for s in Declared.handlers}
    assert set(specs) == {("first", ("x.*",)), ("first", ("a.b", "a.c.>")), ("second", ("z.z",))}
    shared = specs[("first", ("x.*",))]
    assert shared.group == "shared"
    assert shared.start == "earliest"
    assert shared.options == {"max_attempts": 2}
    assert specs[("first", ("a.b", "a.c.>"))].group is DEFAULT_GROUP
    assert [s.method for s in DeclaredChild.handlers] == ["first", "first", "second", "third"]


def test_groups_default_to_agent_and_handler(bus: Bus) -> None:
    agent = Declared(bus, "sorter")
    groups = {s.patterns: agent.group_for(s) for s in Declared.handlers}
    assert groups == {("x.*",): "shared", ("a.b", "a.c.>"): "sorter.first", ("z.z",): None}


def test_default_agent_id_is_the_class_name_in_kebab_case(bus: Bus) -> None:
    class CodeReviewAgent(EventDrivenAgent):
        pass

    assert CodeReviewAgent(bus).agent_id == "code-review"
    assert Declared(bus).agent_id == "declared"


def test_bad_declarations_fail_at_class_definition() -> None:
    def not_async(self: object, event: Event) -> None: ...

    with pytest.raises(TypeError, match="async def"):
        handles("a.b")(not_async)  # type: ignore[type-var]
    with pytest.raises(SubscribeError):
        handles("a.>.b")
    with pytest.raises(TypeError, match="twice"):

        class Twice(EventDrivenAgent):
            @handles("a.b")
            @handles("a.b")
            async def on(self, event: Event) -> None: ...


# -- typed payloads ----------------------------------------------------------------------------


class Typed(Recorder):
    @handles("test_agents.order.placed")
    async def with_event(self, order: OrderPlaced, event: Event) -> None:
        self.received.append(("with_event", order, event.type))

    @handles("test_agents.order.placed")
    async def payload_only(self, order: OrderPlaced) -> None:
        self.received.append(("payload_only", order))

    @handles("test_agents.task.completed")
    async def task(self, task: TaskCompleted) -> None:
        self.received.append(("task", task))


@pytest.mark.asyncio
async def test_typed_handlers_receive_the_parsed_payload(bus: Bus) -> None:
    async with Typed(bus) as agent:
        await bus.publish(Event(type="test_agents.order.placed",
                                payload={"order_id": "o-1", "amount": 3}))
        await eventually(lambda: len(agent.received) == 2)
    order = OrderPlaced(order_id="o-1", amount=3)
    assert sorted(agent.received, key=str) == sorted(
        [("with_event", order, "test_agents.order.placed"), ("payload_only", order)], key=str
    )


@pytest.mark.asyncio
async def test_typed_handler_reads_an_old_version_through_the_upcaster(bus: Bus) -> None:
    async with Typed(bus) as agent:
        await bus.publish(Event(type="test_agents.task.completed", version=1,
                                payload={"task_id": "t-1"}))
        await bus.publish(Event(type="test_agents.task.completed", version=2,
                                payload={"task_id": "t-2", "duration_s": 1.5}))
        await eventually(lambda: len(agent.received) == 2)
    got = sorted((task for _, task in agent.received), key=lambda t: t.task_id)
    assert got == [TaskCompleted(task_id="t-1", duration_s=0.0),
                   TaskCompleted(task_id="t-2", duration_s=1.5)]


class BadSignature(EventDrivenAgent):
    @handles("a.b")
    async def on(self, count: int) -> None: ...


@pytest.mark.asyncio
async def test_unsupported_handler_signature_fails_start_and_emits_agent_failed(
    bus: Bus,
) -> None:
    failures = await record(bus, "agent.failed")
    agent = BadSignature(bus, "bad")
    with pytest.raises(ConfigurationError, match="annotate the first parameter"):
        await agent.start()
    assert not agent.running
    await eventually(lambda: len(failures) == 1)
    failed = schemas.parse(failures[0], AgentFailed)
    assert failed.phase == "start"
    assert failed.error_type == "ConfigurationError"


@pytest.mark.asyncio
async def test_event_annotation_resolves_without_a_runtime_import(bus: Bus) -> None:
    # A module that imports Event under TYPE_CHECKING only (as ruff's TC rules suggest).
    namespace: dict[str, Any] = {"EventDrivenAgent": EventDrivenAgent, "handles": handles}
    source = (
        "from __future__ import annotations\n"
        "class Lazy(EventDrivenAgent):\n"
        "    @handles('lazy.event')\n"
        "    async def on(self, event: Event) -> None:\n"
        "        self.seen = event\n"
    )
    exec(compile(source, "lazy_module", "exec"), namespace)
    async with namespace["Lazy"](bus, "lazy") as agent:
        await bus.publish(Event(type="lazy.event"))
        await eventually(lambda: hasattr(agent, "seen"))
    assert agent.seen.type == "lazy.event"


# -- emit --------------------------------------------------------------------------------------


class Relay(Recorder):
    @handles("relay.in")
    async def forward(self, event: Event) -> None:
        self.received.append(await self.emit("relay.out", {"n": event.payload["n"]}))


@pytest.mark.asyncio
async def test_emit_sets_source_correlation_and_causation(bus: Bus) -> None:
    out = await record(bus, "relay.out")
    async with Relay(bus, "relay") as relay:
        root = await relay.emit("relay.in", {"n": 1}, key="k1")
        assert root.source == "relay"
        assert root.key == "k1"
        assert root.correlation_id == str(root.id)  # a workflow root correlates to itself
        assert root.causation_id is None
        await eventually(lambda: len(out) == 1)
    produced = out[0]
    assert produced.source == "relay"
    assert produced.correlation_id == str(root.id)
    assert produced.causation_id == str(root.id)
    assert produced.payload == {"n": 1}

    # An event from outside, with its own correlation: it is kept, the cause is set.
    foreign = Event(type="relay.in", correlation_id="wf-7", payload={"n": 2})
    explicit = await relay.emit("relay.out", {"n": 2}, caused_by=foreign)
    assert (explicit.correlation_id, explicit.causation_id) == ("wf-7", str(foreign.id))


@pytest.mark.asyncio
async def test_emit_a_model_takes_type_and_version_from_the_registry(bus: Bus) -> None:
    agent = Recorder(bus, "emitter")
    event = await agent.emit(TaskCompleted(task_id="t", duration_s=2.0))
    assert (event.type, event.version) == ("test_agents.task.completed", 2)
    assert event.payload == {"task_id": "t", "duration_s": 2.0}
    with pytest.raises(TypeError, match="source"):
        await agent.emit("a.b", {}, source="someone-else")


# -- lifecycle ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_start_and_stop_emit_lifecycle_events(bus: Bus) -> None:
    lifecycle = await record(bus, "agent.*")
    agent = Declared(bus, "sorter")
    async with agent:
        assert agent.running
        assert len(agent.subscriptions) == 4
    assert not agent.running
    await eventually(lambda: len(lifecycle) == 2)
    started, stopped = lifecycle
    assert (started.type, stopped.type) == ("agent.started", "agent.stopped")
    assert started.source == stopped.source == "sorter"
    payload = schemas.parse(started, AgentStarted)
    assert payload.capabilities == ["sorting", "filing"]
    assert sorted(payload.handles) == ["a.b", "a.c.>", "x.*", "z.z"]
    assert payload.instance_id == agent.instance_id


class Flaky(Recorder):
    @handles("job.run", max_attempts=2)
    async def run(self, event: Event) -> None:
        self.received.append(event)
        raise RuntimeError(f"cannot run {event.payload['job']}")


@pytest.mark.asyncio
async def test_handler_failing_its_last_attempt_emits_agent_failed(bus: Bus) -> None:
    failures = await record(bus, "agent.failed")
    async with Flaky(bus, "flaky") as agent:
        job = Event(type="job.run", payload={"job": "backup"}, correlation_id="wf-1")
        await bus.publish(job)
        await eventually(lambda: len(failures) == 1)
        await asyncio.sleep(0.05)
    assert len(agent.received) == 2  # both attempts ran, only the last one reported
    assert len(failures) == 1
    failure = failures[0]
    assert failure.source == "flaky"
    assert (failure.correlation_id, failure.causation_id) == ("wf-1", str(job.id))
    payload = schemas.parse(failure, AgentFailed)
    assert payload.phase == "handler"
    assert payload.handler == "run"
    assert payload.error == "cannot run backup"
    assert payload.error_type == "RuntimeError"
    assert payload.attempts == 2
    assert payload.group == "flaky.run"
    letters = await bus.dead_letters("flaky.run")
    assert [letter.event_id for letter in letters] == [str(job.id)]


class Misconfigured(EventDrivenAgent):
    @handles("a.b")
    async def fine(self, event: Event) -> None: ...

    @handles("a.c", max_in_flight=0)
    async def broken(self, event: Event) -> None: ...


@pytest.mark.asyncio
async def test_failed_start_undoes_its_subscriptions(bus: Bus) -> None:
    failures = await record(bus, "agent.failed")
    agent = Misconfigured(bus, "misconfigured")
    with pytest.raises(SubscribeError, match="max_in_flight"):
        await agent.start()
    assert agent.subscriptions == ()
    await eventually(lambda: len(failures) == 1)
    assert schemas.parse(failures[0], AgentFailed).error_type == "SubscribeError"


# -- groups ------------------------------------------------------------------------------------


class Worker(Recorder):
    @handles("work.item", max_in_flight=1)
    async def work(self, event: Event) -> None:
        await asyncio.sleep(0.01)
        self.received.append(event.payload["n"])


async def _publish_items(bus: Bus, count: int) -> None:
    await bus.publish_many(Event(type="work.item", payload={"n": n}) for n in range(count))


@pytest.mark.asyncio
async def test_different_agents_each_receive_every_event(bus: Bus) -> None:
    async with Worker(bus, "left") as left, Worker(bus, "right") as right:
        await _publish_items(bus, 10)
        await eventually(lambda: len(left.received) == len(right.received) == 10)
    assert sorted(left.received) == sorted(right.received) == list(range(10))


@pytest.mark.asyncio
async def test_replicas_of_one_agent_share_the_work(bus: Bus) -> None:
    async with Worker(bus, "pool") as one, Worker(bus, "pool") as two:
        await _publish_items(bus, 20)
        await eventually(lambda: len(one.received) + len(two.received) == 20)
        await asyncio.sleep(0.05)
    assert sorted(one.received + two.received) == list(range(20))  # each exactly once
    assert one.received
    assert two.received


# -- audit -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_audit_agent_records_each_event_once_per_workflow(bus: Bus) -> None:
    store = create_store("memory://")
    try:
        audit = AuditAgent(bus, store)
        async with audit, Relay(bus, "relay") as relay:
            root = await relay.emit("relay.in", {"n": 1})
            stream = f"workflow-{root.id}"

            async def recorded() -> list[str]:
                return [r.event.type for r in await store.read_stream(stream)]

            await _until(recorded, ["relay.in", "relay.out"])
            await audit.record(root)  # a redelivery: already stored, not an error
            assert await recorded() == ["relay.in", "relay.out"]
    finally:
        await store.close()


async def _until(read: Callable[[], Awaitable[list[str]]], expected: list[str]) -> None:
    for _ in range(300):
        if await read() == expected:
            return
        await asyncio.sleep(0.01)
    assert await read() == expected


class StrictOrders(Recorder):
    @handles("test_agents.order.placed", max_attempts=5)
    async def take(self, order: OrderPlaced) -> None:
        self.received.append(order)


@pytest.mark.asyncio
async def test_invalid_payload_is_dead_lettered_at_once_not_retried(bus: Bus) -> None:
    failures = await record(bus, "agent.failed")
    async with StrictOrders(bus, "strict") as agent:
        bad = Event(type="test_agents.order.placed", payload={"order_id": "o-9"})  # no amount
        await bus.publish(bad)
        await eventually(lambda: len(failures) == 1)
        letters = await bus.dead_letters("strict.take")
    assert agent.received == []
    assert [(letter.event_id, letter.attempts) for letter in letters] == [(str(bad.id), 1)]
    assert letters[0].error_type == "RejectEvent"
    assert "amount" in letters[0].error
