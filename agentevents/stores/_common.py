"""Helpers both built-in stores share: JSON, lossless timestamps, batch checks, URL flags."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from agentevents.core.errors import ConfigurationError, DuplicateEventError, EventValidationError
from agentevents.core.event import Event

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "aware_utc",
    "check_batch",
    "from_micros",
    "json_dumps",
    "json_loads",
    "to_micros",
    "url_flag",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def json_dumps(value: Any, what: str) -> bytes:
    """``value`` as compact JSON; :class:`EventValidationError` (naming ``what``) if not JSON."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise EventValidationError(f"{what} is not JSON-serialisable: {exc}") from exc


def json_loads(text: str | bytes) -> Any:
    """Parse JSON written by :func:`json_dumps`."""
    return orjson.loads(text)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch: exact for every aware datetime."""
    return (moment - _EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    """The aware UTC datetime :func:`to_micros` came from."""
    # timedelta(0, 0, micros) is timedelta(microseconds=micros), made twice as fast: stores
    # call this for every event they read.
    return _EPOCH + timedelta(0, 0, micros)


def aware_utc(moment: datetime, what: str) -> datetime:
    """``moment`` in UTC; naive datetimes are refused like :class:`Event` refuses them."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise EventValidationError(f"{what} is a naive datetime: pass a timezone-aware one")
    return moment.astimezone(UTC)


def check_batch(events: Sequence[Event]) -> None:
    """Refuse a batch that is not a sequence of events or repeats an event id."""
    for event in events:
        if not isinstance(event, Event):
            raise TypeError(f"append() takes Event objects, not {type(event).__name__}")
    repeated = [str(i) for i, n in Counter(e.id for e in events).items() if n > 1]
    if repeated:
        raise DuplicateEventError(repeated)


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def url_flag(value: str, option: str, shown_url: str) -> bool:
    """A boolean URL query option (``?outbox=true``); ``shown_url`` must be redacted."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigurationError(
        f"{shown_url!r}: ?{option}= takes true or false (also 1/0, yes/no, on/off), "
        f"not {value!r}"
    )
