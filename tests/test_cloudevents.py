"""Our wire format is CloudEvents 1.0 as the official SDK reads and writes it.

The SDK is a test-only dependency. Version 2.x has the ``cloudevents.core`` API (used
here); 1.x only has ``cloudevents.http.from_json``, which the fallback covers.
"""

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from agentevents.core.codec import decode_event, encode_event
from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import EventValidationError
from agentevents.core.event import Event

pytest.importorskip("cloudevents", reason="the CloudEvents SDK is a test dependency")


def sdk_parse(body: bytes) -> tuple[dict[str, Any], Any]:
    """(attributes, data) of a structured-mode JSON CloudEvent, parsed by the SDK."""
    try:
        from cloudevents.core.formats.json import JSONFormat
    except ImportError:  # cloudevents 1.x
        from cloudevents.http import from_json

        legacy = from_json(body)
        return dict(legacy.get_attributes()), legacy.get_data()
    parsed = JSONFormat().read(None, body)
    return dict(parsed.get_attributes()), parsed.get_data()


def sdk_write(attributes: dict[str, Any], data: dict[str, Any]) -> bytes:
    """A structured-mode JSON CloudEvent written by the SDK."""
    try:
        from cloudevents.core.formats.json import JSONFormat
        from cloudevents.core.v1.event import CloudEvent
    except ImportError:  # cloudevents 1.x
        from cloudevents.conversion import to_structured
        from cloudevents.http import CloudEvent as LegacyCloudEvent

        legacy_attributes = {
            k: v.isoformat() if isinstance(v, datetime) else v for k, v in attributes.items()
        }
        _headers, body = to_structured(LegacyCloudEvent(legacy_attributes, data))
        return bytes(body)
    return JSONFormat().write(CloudEvent(dict(attributes), data))


def full_event() -> Event:
    return Event(
        type="code.deployment.completed",
        version=3,
        time=datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC),
        source="agent-deployer",
        correlation_id="workflow-9",
        causation_id=str(uuid.uuid4()),
        key="service-api",
        payload={"service": "api", "ok": True, "took": 12.5, "tags": ["a", "b"], "n": None},
        metadata={"tenant": "acme", "traceparent": "00-abc-def-01"},
    )


def test_our_wire_bytes_parse_with_the_sdk() -> None:
    event = full_event()
    attributes, data = sdk_parse(encode_event(event))
    assert attributes["specversion"] == "1.0"
    assert attributes["id"] == str(event.id)
    assert attributes["type"] == event.type
    assert attributes["source"] == event.source
    assert attributes["datacontenttype"] == "application/json"
    time = attributes["time"]
    if isinstance(time, str):  # the 1.x SDK keeps the text
        time = datetime.fromisoformat(time.replace("Z", "+00:00"))
    assert time == event.time
    assert data == event.payload
    assert attributes["correlationid"] == event.correlation_id
    assert attributes["causationid"] == event.causation_id
    assert attributes["partitionkey"] == event.key
    assert attributes["schemaversion"] == event.version
    assert attributes["tenant"] == "acme"
    assert attributes["traceparent"] == "00-abc-def-01"


def test_a_minimal_event_parses_with_the_sdk() -> None:
    event = Event(type="task.failed")
    attributes, data = sdk_parse(encode_event(event))
    assert (attributes["id"], attributes["type"], attributes["source"]) == (
        str(event.id), "task.failed", "agentevents"
    )
    assert data == {}
    for absent in ("correlationid", "causationid", "partitionkey"):
        assert absent not in attributes


def test_sdk_written_events_decode_to_the_same_event() -> None:
    event = full_event()
    attributes = {
        "id": str(event.id),
        "source": event.source,
        "type": event.type,
        "time": event.time,
        "datacontenttype": "application/json",
        "schemaversion": event.version,
        "correlationid": event.correlation_id,
        "causationid": event.causation_id,
        "partitionkey": event.key,
        "tenant": "acme",
        "traceparent": "00-abc-def-01",
    }
    body = sdk_write(attributes, dict(event.payload))
    assert decode_event(body) == event


def test_foreign_cloudevent_from_another_producer_is_accepted() -> None:
    body = sdk_write(
        {"id": "order-1234", "source": "https://shop.example/orders", "type": "shop.order.placed",
         "time": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "region": "eu"},
        {"total": 42},
    )
    # Our ids are UUIDs: a foreign non-UUID id is refused with the reason, never crashes.
    with pytest.raises(EventValidationError, match="id"):
        decode_event(body)
    ce = json.loads(body)
    ce["id"] = str(uuid.uuid4())
    event = decode_event(json.dumps(ce).encode())
    assert event.type == "shop.order.placed"
    assert event.payload == {"total": 42}
    assert event.metadata == {"region": "eu"}
    assert event.version == 1


def test_dead_letter_body_is_a_cloudevent_the_sdk_reads() -> None:
    event = full_event()
    text, is_b64 = DeadLetter.encode_body(encode_event(event))
    letter = DeadLetter(group="g", pattern="code.>", topic=event.type, event_id=str(event.id),
                        event_type=event.type, error="boom", error_type="RuntimeError",
                        attempts=5, body=text, body_base64=is_b64)
    restored = DeadLetter.model_validate_json(letter.model_dump_json())
    attributes, data = sdk_parse(restored.original_bytes())
    assert attributes["id"] == str(event.id)
    assert data == event.payload
    assert decode_event(restored.original_bytes()) == event
