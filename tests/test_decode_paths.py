"""The codec's two decode paths agree: the fast one (pydantic-core straight from the bytes,
then :func:`construct_checked`) and the full one (``Event.model_validate``).

Every document the fast path accepts must give exactly the event the full path gives;
documents it refuses fall through to the full path, which accepts or refuses them with its
own messages. If pydantic's internals or :class:`Event`'s rules change, these tests fail.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import orjson
import pydantic
import pytest

from agentevents.core.codec import _from_wire, decode_event, encode_event, from_cloudevent
from agentevents.core.errors import EventValidationError
from agentevents.core.event import Event, construct_checked

EVENTS = [
    Event(type="a", payload={}),
    Event(type="task.completed", source="agent-1", key="k", correlation_id="c",
          causation_id="d", version=3, payload={"n": 1, "nested": {"x": [1, 2.5, None]}},
          metadata={"traceparent": "00-abc", "tenant": "t1"}),
    Event(type="x_y.z9", source="s" * 255, key="ü" * 255, payload={"big": 2**63 - 1, "s": "é"},
          time=datetime(2020, 1, 1, 12, tzinfo=timezone(timedelta(hours=5)))),
    Event(type="t", time=datetime(1970, 1, 1, tzinfo=UTC), payload={"": ""}),
]


def full_path(body: bytes) -> Event:
    return from_cloudevent(orjson.loads(body))


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_fast_path_decodes_what_encode_writes_equal_to_the_full_path(event: Event) -> None:
    body = encode_event(event)
    fast = _from_wire(body)
    assert fast is not None, "the fast path must take our own encoding"
    full = full_path(body)
    assert fast == full == event
    assert fast.model_dump() == full.model_dump()
    assert fast.time.utcoffset() == timedelta(0)
    assert type(fast.id) is UUID


def test_constructed_events_behave_like_validated_ones() -> None:
    event = EVENTS[1]
    made = construct_checked(event.id, event.type, event.version, event.time, event.source,
                             event.correlation_id, event.causation_id, event.key,
                             event.payload, event.metadata)
    assert made == event
    assert made.model_dump_json() == event.model_dump_json()
    assert made.model_fields_set == set(Event.model_fields)
    with pytest.raises(pydantic.ValidationError):
        made.type = "other"  # type: ignore[misc]
    assert made.with_changes(source="b").source == "b"


def base_document() -> dict[str, Any]:
    return orjson.loads(encode_event(EVENTS[1]))


def changed(**changes: Any) -> bytes:
    doc = base_document()
    for name, value in changes.items():
        if value is _DROP:
            doc.pop(name)
        else:
            doc[name] = value
    return orjson.dumps(doc)


_DROP = object()

#: Documents of other producers, or broken ones: each must decode exactly as the full path
#: decodes it, or fail on both.
OTHER_DOCUMENTS = {
    "json suffix content type": changed(datacontenttype="application/vnd.x+json"),
    "schemaversion as text": changed(schemaversion="2"),
    "schemaversion null": changed(schemaversion=None),
    "integer extension": changed(priority=5),
    "boolean extension": changed(urgent=True),
    "reserved subject attribute": changed(subject="s"),
    "offset time": changed(time="2026-01-01T10:00:00+02:00"),
    "time out of range in UTC": changed(time="0001-01-01T00:00:00+01:00"),
    "naive time": changed(time="2026-01-01T10:00:00"),
    "no time": changed(time=_DROP),
    "urn id": changed(id="urn:uuid:0192d7a4-1b2c-7d3e-8f40-123456789abc"),
    "hex id": changed(id="0192d7a41b2c7d3e8f40123456789abc"),
    "not a uuid": changed(id="order-1"),
    "empty source": changed(source=""),
    "no source": changed(source=_DROP),
    "bad type": changed(type="Bad Type"),
    "long key": changed(partitionkey="k" * 256),
    "data null": changed(data=None),
    "data a list": changed(data=[1, 2]),
    "no data": changed(data=_DROP),
    "bad extension name": changed(**{"Bad-Name": "x"}),
    "specversion 0.3": changed(specversion="0.3"),
    "xml content": changed(datacontenttype="application/xml"),
    "version zero": changed(schemaversion=0),
    "version true": changed(schemaversion=True),
    "not an object": b"[1, 2]",
    "not json": b"{nope",
}


@pytest.mark.parametrize("body", OTHER_DOCUMENTS.values(), ids=OTHER_DOCUMENTS.keys())
def test_other_documents_decode_as_the_full_path_decodes_them(body: bytes) -> None:
    try:
        expected: Event | type[Exception] = full_path(body)
    except (EventValidationError, orjson.JSONDecodeError):
        expected = EventValidationError
    fast = _from_wire(body)
    if expected is EventValidationError:
        assert fast is None
        with pytest.raises(EventValidationError):
            decode_event(body)
    else:
        assert fast is None or fast == expected
        decoded = decode_event(body)
        # Without a time, each decode stamps its own "now"; the rest must agree.
        assert decoded.model_dump(exclude={"time"}) == expected.model_dump(exclude={"time"})
        assert decoded.time == expected.time or b'"time"' not in body
