"""Events <-> CloudEvents 1.0 structured-mode JSON, the format on every wire.

Mapping (lossless both ways):

============================  =======================================================
Event field                   CloudEvents attribute
============================  =======================================================
``id``                        ``id`` (UUID text)
``type``                      ``type``
``source``                    ``source``
``time``                      ``time`` (RFC 3339, UTC)
``payload``                   ``data`` with ``datacontenttype: application/json``
``version``                   extension ``schemaversion`` (integer)
``correlation_id``            extension ``correlationid``
``causation_id``              extension ``causationid``
``key``                       extension ``partitionkey`` (the CE Partitioning extension)
``metadata[name]``            extension ``name`` (one attribute per entry)
============================  =======================================================

Absent optional fields are omitted, not written as null. Unknown extensions found when
decoding become metadata, so events from other CloudEvents producers are accepted, provided
their ``id`` is a UUID (agentevents' idempotency key) and their ``data`` a JSON object;
``id``, ``source`` and ``type`` are required, as the CloudEvents spec says.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from pydantic import ValidationError

from agentevents.core.errors import EventValidationError
from agentevents.core.event import RESERVED_METADATA_KEYS, Event

__all__ = ["decode_event", "encode_event", "from_cloudevent", "to_cloudevent"]

SPECVERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"
_ORJSON_OPTIONS = orjson.OPT_UTC_Z
_CORE = frozenset({"specversion", "id", "source", "type", "time", "datacontenttype", "data"})


def _attributes(event: Event, id: Any, time: Any) -> dict[str, Any]:
    ce: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id,
        "source": event.source,
        "type": event.type,
        "time": time,
        "datacontenttype": "application/json",
        "schemaversion": event.version,
    }
    if event.correlation_id is not None:
        ce["correlationid"] = event.correlation_id
    if event.causation_id is not None:
        ce["causationid"] = event.causation_id
    if event.key is not None:
        ce["partitionkey"] = event.key
    if event.metadata:
        ce.update(event.metadata)
    ce["data"] = event.payload
    return ce


def to_cloudevent(event: Event) -> dict[str, Any]:
    """The structured-mode CloudEvent (a JSON-ready dict) for ``event``."""
    return _attributes(event, str(event.id), event.time.isoformat().replace("+00:00", "Z"))


def from_cloudevent(ce: dict[str, Any]) -> Event:
    """Parse a structured-mode CloudEvent dict; raises :class:`EventValidationError`."""
    if not isinstance(ce, dict):
        raise EventValidationError(f"a CloudEvent must be a JSON object, got {type(ce).__name__}")
    if ce.get("specversion") != SPECVERSION:
        raise EventValidationError(
            f"unsupported CloudEvents specversion {ce.get('specversion')!r}; expected '1.0'"
        )
    content_type = ce.get("datacontenttype", "application/json")
    if content_type != "application/json" and not str(content_type).endswith("+json"):
        raise EventValidationError(
            f"unsupported datacontenttype {content_type!r}: agentevents payloads are JSON objects"
        )
    metadata: dict[str, str] = {}
    for name, value in ce.items():
        if name in _CORE or name in RESERVED_METADATA_KEYS:
            continue
        metadata[name] = value if isinstance(value, str) else str(value)
    missing = [name for name in ("id", "source", "type") if not ce.get(name)]
    if missing:
        raise EventValidationError(
            f"invalid CloudEvent: required attribute(s) {', '.join(missing)} missing"
        )
    fields: dict[str, Any] = {
        "id": ce.get("id"),
        "type": ce.get("type"),
        "source": ce.get("source"),
        "time": ce.get("time"),
        "version": ce.get("schemaversion", 1),
        "correlation_id": ce.get("correlationid"),
        "causation_id": ce.get("causationid"),
        "key": ce.get("partitionkey"),
        "payload": ce.get("data") if ce.get("data") is not None else {},
        "metadata": metadata,
    }
    try:
        return Event.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise EventValidationError(f"invalid CloudEvent: {_short(exc)}") from exc
    except (ValueError, TypeError, OverflowError) as exc:  # raised past pydantic's wrapping
        raise EventValidationError(f"invalid CloudEvent: {exc!r}") from exc


def encode_event(event: Event) -> bytes:
    """The wire bytes of ``event``: structured-mode CloudEvents JSON.

    Equal to ``orjson.dumps(to_cloudevent(event))``, but orjson formats the id and the time
    natively, which is several times faster on the publish path.
    """
    return orjson.dumps(_attributes(event, event.id, event.time), default=_json_default,
                        option=_ORJSON_OPTIONS)


def decode_event(body: bytes | bytearray | memoryview | str) -> Event:
    """Parse wire bytes back into an :class:`Event`; raises :class:`EventValidationError`."""
    try:
        ce = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventValidationError(f"message is not JSON: {exc}") from exc
    return from_cloudevent(ce)


def _json_default(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"payload value of type {type(value).__name__} is not JSON-serialisable")


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )
