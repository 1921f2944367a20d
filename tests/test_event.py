"""The event envelope, the codec and the schema registry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from agentevents import (
    Event,
    EventValidationError,
    SchemaRegistry,
    UnknownEventTypeError,
    decode_event,
    encode_event,
    from_cloudevent,
    to_cloudevent,
)


def test_defaults_are_filled_and_time_ordered() -> None:
    first = Event(type="task.created")
    second = Event(type="task.created")
    assert first.id.version == 7
    assert first.id != second.id
    assert str(first.id) < str(second.id) or first.time <= second.time
    assert first.time.tzinfo is not None
    assert first.version == 1
    assert first.payload == {}


@pytest.mark.parametrize(
    "name", ["Task.created", "task..created", ".task", "task.", "task-created", "tâche", ""]
)
def test_bad_type_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError):
        Event(type=name)


@pytest.mark.parametrize("name", ["task", "code.deployment.failed", "a_b.c1.x_2"])
def test_good_type_names_are_accepted(name: str) -> None:
    assert Event(type=name).type == name


def test_naive_time_is_rejected_and_aware_time_becomes_utc() -> None:
    with pytest.raises(ValidationError, match="naive datetime"):
        Event(type="a.b", time=datetime(2025, 1, 1, 12, 0))
    plus_two = timezone(timedelta(hours=2))
    event = Event(type="a.b", time=datetime(2025, 1, 1, 14, 0, tzinfo=plus_two))
    assert event.time == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert event.time.utcoffset() == timedelta(0)


def test_payload_must_be_json() -> None:
    with pytest.raises(ValidationError, match="not JSON-serialisable"):
        Event(type="a.b", payload={"tags": {1, 2}})


def test_events_are_immutable() -> None:
    event = Event(type="a.b", payload={"x": 1})
    with pytest.raises(ValidationError):
        event.type = "c.d"  # type: ignore[misc]


@pytest.mark.parametrize("key", ["Tenant", "x-tenant", "id", "data", "partitionkey", ""])
def test_metadata_keys_must_be_extension_names(key: str) -> None:
    with pytest.raises(ValidationError):
        Event(type="a.b", metadata={key: "v"})


def test_model_payload_is_dumped_to_json_object() -> None:
    class Deployed(BaseModel):
        service: str
        when: datetime

    when = datetime(2025, 12, 15, 14, 30, tzinfo=UTC)
    event = Event.model_validate(
        {"type": "code.deployment.completed", "payload": Deployed(service="api", when=when)}
    )
    assert event.payload == {"service": "api", "when": "2025-12-15T14:30:00Z"}


def test_caused_event_carries_correlation_and_causation() -> None:
    root = Event(type="code.pull_request.opened", source="github")
    child = root.caused("code.review.completed", {"score": 9}, source="reviewer")
    grandchild = child.caused("code.deployment.started", source="deployer")
    assert child.correlation_id == str(root.id)
    assert child.causation_id == str(root.id)
    assert grandchild.correlation_id == str(root.id)
    assert grandchild.causation_id == str(child.id)


def _full_event() -> Event:
    return Event(
        type="code.deployment.failed",
        version=3,
        source="deployer-1",
        correlation_id="wf-1",
        causation_id="c-9",
        key="user-service",
        payload={"error": "timeout ⏱", "nested": {"list": [1, 2.5, None, True]}},
        metadata={"traceparent": "00-abc-def-01", "tenant": "acme"},
        time=datetime(2025, 12, 15, 14, 30, 0, 123456, tzinfo=UTC),
    )


def test_cloudevent_mapping_is_lossless() -> None:
    event = _full_event()
    ce = to_cloudevent(event)
    assert ce["specversion"] == "1.0"
    assert ce["id"] == str(event.id)
    assert ce["time"] == "2025-12-15T14:30:00.123456Z"
    assert ce["data"] == event.payload
    assert ce["schemaversion"] == 3
    assert ce["partitionkey"] == "user-service"
    assert ce["correlationid"] == "wf-1"
    assert ce["traceparent"] == "00-abc-def-01"
    assert from_cloudevent(ce) == event


def test_wire_bytes_are_the_cloudevent_and_round_trip() -> None:
    event = _full_event()
    body = encode_event(event)
    assert orjson.loads(body) == to_cloudevent(event)
    assert decode_event(body) == event


def test_foreign_cloudevent_extensions_become_metadata() -> None:
    ce = {
        "specversion": "1.0", "id": "0194b3a0-0000-7000-8000-000000000001",
        "source": "/sensors/1", "type": "anomaly.detected", "time": "2025-01-01T00:00:00Z",
        "data": {"level": 3}, "comexampleext": 5,
    }
    event = from_cloudevent(ce)
    assert event.metadata == {"comexampleext": "5"}
    assert event.version == 1
    assert event.payload == {"level": 3}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"specversion": "0.3"}', "specversion"),
        (b'{"specversion": "1.0", "id": "x", "type": "Bad Type", "source": "s"}', "invalid"),
        (
            b'{"specversion": "1.0", "datacontenttype": "text/plain", "data": "x"}',
            "datacontenttype",
        ),
    ],
)
def test_undecodable_bytes_raise_validation_error(body: bytes, reason: str) -> None:
    with pytest.raises(EventValidationError, match=reason):
        decode_event(body)


# -- schema registry --------------------------------------------------------------------


def test_typed_payloads_and_upcasters() -> None:
    registry = SchemaRegistry()

    @registry.payload("task.completed", version=1)
    class TaskCompletedV1(BaseModel):
        task_id: str

    @registry.payload("task.completed", version=2)
    class TaskCompletedV2(BaseModel):
        task_id: str
        duration_s: float

    @registry.payload("task.completed", version=3)
    class TaskCompleted(BaseModel):
        task_id: str
        duration_ms: int

    @registry.upcaster("task.completed", from_version=1)
    def v1_to_v2(payload: dict[str, object]) -> dict[str, object]:
        return {**payload, "duration_s": 0.5}

    @registry.upcaster("task.completed", from_version=2)
    def v2_to_v3(payload: dict[str, object]) -> dict[str, object]:
        seconds = payload.pop("duration_s")
        assert isinstance(seconds, float)
        return {**payload, "duration_ms": int(seconds * 1000)}

    old = registry.event(TaskCompletedV1(task_id="t1"), source="worker")
    assert (old.type, old.version) == ("task.completed", 1)
    assert registry.parse(old, TaskCompleted) == TaskCompleted(task_id="t1", duration_ms=500)
    assert registry.parse(old, TaskCompletedV2).duration_s == 0.5
    assert registry.upcast(old).version == 3
    assert old.version == 1  # history is never edited
    assert registry.latest_version("task.completed") == 3


def test_missing_upcaster_and_unregistered_model_say_what_to_do() -> None:
    registry = SchemaRegistry()

    @registry.payload("a.b", version=2)
    class V2(BaseModel):
        x: int

    class Unregistered(BaseModel):
        x: int

    with pytest.raises(UnknownEventTypeError, match=r"@schemas.upcaster\('a.b', from_version=1\)"):
        registry.parse(Event(type="a.b", version=1, payload={"x": 1}), V2)
    with pytest.raises(UnknownEventTypeError, match="not registered"):
        registry.event(Unregistered(x=1))
    with pytest.raises(EventValidationError, match="newer"):
        registry.upcast(Event(type="a.b", version=3), 2)
    with pytest.raises(EventValidationError, match="does not validate"):
        registry.parse(Event(type="a.b", version=2, payload={"x": "nope"}), V2)


def test_a_model_cannot_be_replaced_silently() -> None:
    registry = SchemaRegistry()

    class A(BaseModel):
        x: int

    class B(BaseModel):
        y: int

    registry.register("a.b", A)
    registry.register("a.b", A)  # idempotent
    with pytest.raises(EventValidationError, match="new version"):
        registry.register("a.b", B)
