"""The one exception hierarchy of agentevents.

Every error the framework raises on purpose derives from :class:`AgentEventsError`;
driver and broker errors are translated at the adapter edge (``raise ... from exc``)
into the most specific class below, so callers never catch a client library's types::

    AgentEventsError
    ├── ConfigurationError            bad URL, option or settings value
    │   ├── UnknownBackendError       no installed plugin handles the URL scheme
    │   ├── MissingDependencyError    the backend's client library (extra) is not installed
    │   ├── OutboxNotEnabledError     an outbox operation on a store without the outbox on
    │   │   └── OutboxNotInTablesError  the SQL store's tables do not have the outbox enabled
    │   └── RelayNameError            a relay name other than the one the outbox is relayed under
    ├── EventValidationError          an event or payload does not satisfy its schema
    │   └── UnknownEventTypeError     no payload model is registered for (type, version)
    ├── BusError
    │   ├── PublishError              the broker did not durably accept an event
    │   │   └── PayloadTooLargeError  the encoded event exceeds the backend's limit
    │   ├── SubscribeError            a subscription could not be created
    │   ├── RejectEvent               raised by a handler: dead-letter now, do not retry
    │   └── BusClosedError            the bus was used after ``close()``
    ├── StoreError
    │   ├── ConcurrencyError          ``expected_version`` did not match the stream
    │   ├── DuplicateEventError       an event id is already stored
    │   ├── LeaseLostError            an outbox relay's lease was taken over (fence moved on)
    │   ├── CorruptEventError         a stored event cannot be read back (changed outside)
    │   └── StoreClosedError          the store was used after ``close()``
    └── BackendConnectionError        the server behind a (redacted) URL cannot be reached

Messages say what to do next, and never contain a password.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable


class AgentEventsError(Exception):
    """Root of every error agentevents raises on purpose."""


class ConfigurationError(AgentEventsError):
    """A URL, option or setting is invalid; the message names the bad value."""


class UnknownBackendError(ConfigurationError):
    """No installed plugin handles a URL scheme."""

    def __init__(self, scheme: str, kind: str, installed: Iterable[str]) -> None:
        names = ", ".join(sorted(installed)) or "none"
        super().__init__(
            f"no {kind} backend handles the URL scheme {scheme!r}; installed schemes: {names}. "
            "Check the URL, or install the package that provides this backend "
            "(run `agentevents backends` to list what is discovered)."
        )
        self.scheme = scheme
        self.installed = sorted(installed)


class MissingDependencyError(ConfigurationError):
    """A backend's client library is not installed."""

    def __init__(self, backend: str, extra: str | None, module: str) -> None:
        command = f"pip install 'agentevents[{extra}]'" if extra else f"pip install {module}"
        super().__init__(
            f"the {backend} backend needs the Python package {module!r}, which is not installed; "
            f"install it with: {command}"
        )
        self.backend = backend
        self.extra = extra


class OutboxNotEnabledError(ConfigurationError):
    """An outbox operation (relaying) on a store whose outbox is not turned on."""

    def __init__(self, store: str) -> None:
        super().__init__(
            f"the event store {store} does not record its events for publication: its outbox "
            "is off. Turn it on with '?outbox=true' in the store URL (or outbox=True); "
            "events appended while it was off are not in the outbox and will not be relayed"
        )
        self.store = store


class OutboxNotInTablesError(OutboxNotEnabledError):
    """The outbox is a setting of the store's tables (the SQL store), and it is off there.

    ``enable`` says how to turn it on (a command, explicitly: never on connect).
    """

    def __init__(self, store: str, enable: str) -> None:
        ConfigurationError.__init__(
            self,
            f"the tables of the event store {store} do not record events for publication: "
            "their outbox is off. The outbox is a setting of the tables, turned on once, "
            f"explicitly: {enable}. From then on every append to these tables is recorded, "
            "whatever the URL of the store that appends; the relay opens the store with "
            "'?outbox=true'. Events appended before are not in the outbox and are not relayed",
        )
        self.store = store


class RelayNameError(ConfigurationError):
    """A relay asked for the lease of an outbox under a name other than the one it has.

    One outbox is relayed under one name: relays of different names would each delete what
    the others published, so every bus would get only part of the events.
    """

    def __init__(self, store: str, name: str, existing: str, rename: str) -> None:
        super().__init__(
            f"the outbox of {store} is relayed under the name {existing!r}, so a relay named "
            f"{name!r} may not relay it: one outbox is relayed under one name (relays of "
            "different names would each remove what the others published, and each bus "
            "would get only part of the events). Give every relay of this outbox the same "
            "name (--name, OutboxRelay(name=...)). To feed several buses, relay to one bus "
            "and bridge it to the others, or give each bus an outbox of its own (a separate "
            "store or table prefix). To rename the relay, stop its relays and delete the old "
            f"lease: {rename}"
        )
        self.store = store
        self.name = name
        self.existing = existing


class EventValidationError(AgentEventsError, ValueError):
    """An event, its payload or its encoded form is invalid."""


class UnknownEventTypeError(EventValidationError):
    """No payload model is registered for an event type and version."""


class BusError(AgentEventsError):
    """Base class of errors raised by a :class:`~agentevents.core.bus.Bus`."""


class PublishError(BusError):
    """The broker did not durably accept an event; it was not published.

    Publishing is safe to retry: the event id is the idempotency key.
    """


class PayloadTooLargeError(PublishError):
    """An encoded event is larger than the backend accepts."""

    def __init__(self, event_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"event {event_id} encodes to {size} bytes, over this backend's limit of {limit} "
            "bytes; store the large content elsewhere (object storage, the event store) and "
            "publish a reference to it"
        )
        self.size = size
        self.limit = limit


class SubscribeError(BusError):
    """A subscription could not be created (bad pattern, broker refused the consumer)."""


class RejectEvent(BusError):
    """Raise from a handler to dead-letter the event at once, without further retries.

    For events that can never succeed (a payload that does not validate, a reference to
    something that does not exist). The message is the dead letter's reason.
    """


class BusClosedError(BusError):
    """The bus was used after ``close()``; create a new bus."""


class StoreError(AgentEventsError):
    """Base class of errors raised by an event store."""


class ConcurrencyError(StoreError):
    """The stream's version did not match ``expected_version``; nothing was stored.

    Re-read the stream, decide again, and retry the append.
    """

    def __init__(self, stream_id: str, expected: object, actual: int | None) -> None:
        shown = "no stream" if actual is None else f"version {actual}"
        super().__init__(
            f"stream {stream_id!r} is at {shown}, but the append expected {expected}; "
            "nothing was stored. Re-read the stream and retry the command."
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventError(StoreError):
    """An event id in the batch is already stored; nothing of the batch was stored."""

    def __init__(self, event_ids: Iterable[str]) -> None:
        ids = sorted(event_ids)
        super().__init__(
            f"event id(s) {', '.join(ids)} already stored, or repeated within the batch; "
            "nothing of this batch was stored. "
            "Event ids are idempotency keys: treat this as 'already done' or use new ids."
        )
        self.event_ids = ids


class LeaseLostError(StoreError):
    """An outbox relay's lease was taken over by another relay: it must stop publishing.

    Raised instead of marking events published, so a relay that stalled past its lease
    (a long pause, a network partition) cannot interfere with the one that took over. The
    relay goes back to standby; what it published meanwhile is published again (at least
    once).
    """

    def __init__(self, name: str, owner: str, fence: int) -> None:
        super().__init__(
            f"relay {owner!r} no longer holds the outbox lease {name!r} (fence {fence}): "
            "another relay took it over after it expired. This relay stops publishing and "
            "stands by; if it happens often, raise the lease time or shorten the batches"
        )
        self.name = name
        self.owner = owner
        self.fence = fence


class CorruptEventError(StoreError):
    """A stored event cannot be read back: its row was changed or damaged outside agentevents.

    Raised instead of the decoder's own error, naming the position. Nothing skips it
    silently: readers stop at it until the row is repaired (or removed).
    """

    def __init__(self, store: str, position: int, reason: str, remedy: str) -> None:
        super().__init__(
            f"the event at position {position} of the event store {store} cannot be read "
            f"({reason}): its row was changed or damaged outside agentevents. {remedy}"
        )
        self.store = store
        self.position = position


class StoreClosedError(StoreError):
    """The store was used after ``close()``; create a new store."""


class BackendConnectionError(AgentEventsError, ConnectionError):
    """The server behind a URL cannot be reached; the URL in the message is redacted."""
