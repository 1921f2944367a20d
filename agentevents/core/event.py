"""The event envelope: one immutable pydantic model, JSON (CloudEvents 1.0) on the wire."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final, Self
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from uuid_utils.compat import uuid7

__all__ = [
    "EVENT_TYPE_PATTERN",
    "METADATA_KEY_PATTERN",
    "Event",
    "construct_checked",
    "new_event_id",
    "utcnow",
]

#: Dotted lower-case event type names, e.g. ``code.deployment.completed``.
EVENT_TYPE_PATTERN = r"^[a-z0-9_]+(\.[a-z0-9_]+)*$"
#: Metadata keys are CloudEvents extension attribute names, so they survive every broker's
#: header rules and the CloudEvents mapping unchanged (``traceparent``, ``tenant``, ...).
METADATA_KEY_PATTERN = r"^[a-z0-9]+$"
_METADATA_KEY = re.compile(METADATA_KEY_PATTERN)
#: Attribute names the CloudEvents mapping uses itself; metadata may not shadow them.
RESERVED_METADATA_KEYS = frozenset(
    {
        "specversion", "id", "source", "type", "time", "subject", "data", "data_base64",
        "datacontenttype", "dataschema", "correlationid", "causationid", "partitionkey",
        "schemaversion",
    }
)  # fmt: skip


def new_event_id() -> UUID:
    """A new time-ordered (UUIDv7) event id."""
    return uuid7()


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class Event(BaseModel):
    """One immutable event.

    ``id`` is the idempotency key everywhere: stores refuse a second event with the same id,
    brokers that deduplicate use it, and consumers may use it to make handlers idempotent.
    ``payload`` is always a JSON object; a pydantic model given as payload is dumped to one,
    and read back typed through :class:`~agentevents.core.schema.SchemaRegistry`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)

    id: UUID = Field(default_factory=new_event_id)
    type: str = Field(pattern=EVENT_TYPE_PATTERN, max_length=255)
    version: int = Field(default=1, ge=1)
    time: datetime = Field(default_factory=utcnow)
    source: str = Field(default="agentevents", min_length=1, max_length=255)
    correlation_id: str | None = Field(default=None, max_length=255)
    causation_id: str | None = Field(default=None, max_length=255)
    key: str | None = Field(default=None, max_length=255)
    payload: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _dump_model_payload(cls, data: Any) -> Any:
        if isinstance(data, dict):
            payload = data.get("payload")
            if isinstance(payload, BaseModel):
                data = {**data, "payload": payload.model_dump(mode="json")}
        return data

    @field_validator("time")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                "naive datetime: pass a timezone-aware time, e.g. datetime.now(timezone.utc)"
            )
        try:
            return value.astimezone(UTC)
        except OverflowError as exc:
            raise ValueError(f"time {value.isoformat()} is out of range in UTC") from exc

    @field_validator("payload")
    @classmethod
    def _json_payload(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Checked here, not at publish: the memory bus never encodes, and an event that only
        # fails on a real broker (or in the store) is a trap.
        try:
            orjson.dumps(value)
        except TypeError as exc:
            raise ValueError(f"payload is not JSON-serialisable: {exc}") from exc
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _METADATA_KEY.match(name) or name in RESERVED_METADATA_KEYS:
                raise ValueError(
                    f"metadata key {name!r} is not allowed: use lower-case letters and digits "
                    "only (CloudEvents extension names), not a reserved attribute name"
                )
        return value

    def caused(self, type: str, payload: dict[str, Any] | BaseModel | None = None,
               **fields: Any) -> Event:
        """A new event caused by this one: same correlation id, ``causation_id`` = this id."""
        fields.setdefault("correlation_id", self.correlation_id or str(self.id))
        fields.setdefault("causation_id", str(self.id))
        return Event(type=type, payload=payload if payload is not None else {}, **fields)

    def with_changes(self, **changes: Any) -> Self:
        """A validated copy with some fields changed (events themselves never change)."""
        return self.model_validate({**self.model_dump(), **changes})


_ALL_FIELDS: Final = frozenset(Event.model_fields)
_new = object.__new__
_set = object.__setattr__


def construct_checked(
    id: UUID,
    type: str,
    version: int,
    time: datetime,
    source: str,
    correlation_id: str | None,
    causation_id: str | None,
    key: str | None,
    payload: dict[str, Any],
    metadata: dict[str, str],
) -> Event:
    """An :class:`Event` made of values that have *already passed* every rule
    :class:`Event` checks (types, patterns, lengths, aware UTC time, JSON payload, metadata
    names), without validating them a second time.

    For the decoders on hot paths only: the codec, after pydantic validated the wire
    document, and stores reading back rows they validated when writing them. The result
    equals, field for field, what ``Event.model_validate`` makes of the same values
    (``tests/test_event.py`` holds the two together); everything else must go through
    validation.
    """
    event = _new(Event)
    _set(event, "__dict__", {
        "id": id, "type": type, "version": version, "time": time, "source": source,
        "correlation_id": correlation_id, "causation_id": causation_id, "key": key,
        "payload": payload, "metadata": metadata,
    })
    _set(event, "__pydantic_fields_set__", set(_ALL_FIELDS))
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event
