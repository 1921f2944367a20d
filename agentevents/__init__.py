"""agentevents: event-driven coordination for AI agents.

Agents emit events and subscribe to the ones they care about through one :class:`Bus`
(in-memory, Redis Streams, NATS JetStream, Kafka, EventBridge) and keep an append-only
history in one :class:`EventStore` (SQLite, PostgreSQL, MariaDB, in-memory). Backends are
plugins picked by URL. Importing this package imports no broker client.
"""

from agentevents.core.bus import Bus, Delivery, Handler, Subscription, current_delivery
from agentevents.core.codec import decode_event, encode_event, from_cloudevent, to_cloudevent
from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import (
    AgentEventsError,
    BackendConnectionError,
    BusClosedError,
    BusError,
    ConcurrencyError,
    ConfigurationError,
    DuplicateEventError,
    EventValidationError,
    LeaseLostError,
    MissingDependencyError,
    OutboxNotEnabledError,
    PayloadTooLargeError,
    PublishError,
    RejectEvent,
    RelayNameError,
    StoreClosedError,
    StoreError,
    SubscribeError,
    UnknownBackendError,
    UnknownEventTypeError,
)
from agentevents.core.event import Event, new_event_id
from agentevents.core.outbox import Lease, Outbox
from agentevents.core.schema import SchemaRegistry, schemas
from agentevents.core.store import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    EventQuery,
    EventStore,
    RecordedEvent,
    Snapshot,
)
from agentevents.core.transport import Capabilities
from agentevents.plugins.registry import create_bus, create_store
from agentevents.relay import OutboxRelay

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AgentEventsError",
    "BackendConnectionError",
    "Bus",
    "BusClosedError",
    "BusError",
    "Capabilities",
    "ConcurrencyError",
    "ConfigurationError",
    "DeadLetter",
    "Delivery",
    "DuplicateEventError",
    "Event",
    "EventQuery",
    "EventStore",
    "EventValidationError",
    "Handler",
    "Lease",
    "LeaseLostError",
    "MissingDependencyError",
    "Outbox",
    "OutboxNotEnabledError",
    "OutboxRelay",
    "PayloadTooLargeError",
    "PublishError",
    "RecordedEvent",
    "RejectEvent",
    "RelayNameError",
    "SchemaRegistry",
    "Snapshot",
    "StoreClosedError",
    "StoreError",
    "SubscribeError",
    "Subscription",
    "UnknownBackendError",
    "UnknownEventTypeError",
    "create_bus",
    "create_store",
    "current_delivery",
    "decode_event",
    "encode_event",
    "from_cloudevent",
    "new_event_id",
    "schemas",
    "to_cloudevent",
]
