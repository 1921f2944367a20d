"""The transport interface: what a bus backend implements, and nothing more.

A backend moves bytes; the core does everything else. :class:`~agentevents.core.bus.Bus`
owns pattern checks, decoding, retries with backoff, dead-lettering, per-key ordering,
``max_in_flight`` and graceful drain, once, for every backend. A backend implements two
small roles:

* :class:`Transport` -- send a batch durably, open receivers, keep dead letters, close.
* :class:`Receiver` -- one member of one consumer (a group, or an ephemeral subscriber):
  receive a batch, ack a batch, hand messages back (nack, optionally after a delay), keep
  messages that are still being worked on from being redelivered (extend), close.

How the four brokers map (see ``docs/transports.md`` for the full table):

* Redis Streams: send = pipelined ``XADD``; receive = ``XREADGROUP`` plus ``XAUTOCLAIM``
  of entries idle longer than ``ack_timeout``; ack = one multi-id ``XACK``; nack = local
  delay, then re-read from the pending list; extend = ``XCLAIM ... JUSTID`` (resets idle).
* NATS JetStream: send = publish with ``Nats-Msg-Id``, awaiting PubAcks; receive = pull
  ``fetch``; ack = ``+ACK``; nack = ``-NAK`` with delay; extend = ``+WPI`` (in progress);
  ``ack_wait`` = ``ack_timeout``.
* Kafka: send = produce with ``acks=all``; receive = ``getmany``; ack marks an offset done
  and commits only past contiguous done offsets per partition; nack = local re-queue
  (the offset stays uncommitted); extend = nothing (liveness is the consumer heartbeat).
* EventBridge via SQS: send = ``PutEvents`` (no failed entry); receive = ``ReceiveMessage``
  (long poll); ack = ``DeleteMessageBatch``; nack and extend = ``ChangeMessageVisibility``.

Retries of a failing handler happen inside the core, on the same member, so that a key's
later events wait for it (per-key order); the core calls :meth:`Receiver.extend` while a
message is held longer than a fraction of ``ack_timeout``.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agentevents.core.deadletter import DeadLetter
    from agentevents.core.event import Event
    from agentevents.core.patterns import Pattern

__all__ = [
    "Capabilities",
    "ConsumerSpec",
    "InboundMessage",
    "OutboundMessage",
    "Receiver",
    "StartPosition",
    "Transport",
    "durable_name",
]

StartPosition = Literal["latest", "earliest"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend guarantees beyond the core contract; the conformance suite reads it.

    The core contract (durable publish, groups with fan-out and load balancing, wildcards,
    at-least-once with retries and dead letters, ``ack_timeout`` redelivery) is not optional
    and has no flag here.
    """

    #: Events with the same key are handled in publish order *across the members* of a
    #: group (Kafka partitions, the memory broker's sticky keys). Within one member the core
    #: keeps per-key order on every backend.
    ordered_per_key: bool = True
    #: Groups survive the process: a group that was away receives what it missed.
    durable_groups: bool = True
    #: ``start="earliest"`` replays what the broker retains.
    replay: bool = True
    #: A repeated event id, published again within the window, is stored once.
    broker_dedupe: bool = False
    #: Members of a group may live in different processes or machines.
    cross_process: bool = True
    #: Largest encoded event the broker accepts, in bytes (``None``: no fixed limit).
    max_payload_bytes: int | None = None


class OutboundMessage:
    """One event on its way to the broker.

    Built by the bus from an event, its wire ``body`` (structured-mode CloudEvents JSON) is
    encoded on first access and cached, so an in-process transport that delivers the event
    object itself never pays for encoding. A test can also build one from raw bytes alone
    (``event=None``) to put arbitrary, even undecodable, bytes on the wire.
    """

    __slots__ = ("_body", "_id", "event", "key", "topic")

    def __init__(
        self,
        id: str | None,
        topic: str,
        key: str | None,
        body: bytes | None = None,
        event: Event | None = None,
    ) -> None:
        if body is None and event is None:
            raise ValueError("an OutboundMessage needs a body, an event, or both")
        if id is None and event is None:
            raise ValueError("an OutboundMessage without an event needs an id")
        self._id = id
        #: The event type; backends route by it (stream, subject, topic, detail-type).
        self.topic = topic
        #: Ordering/partition key, or ``None``.
        self.key = key
        self._body = body
        #: The event itself; an in-process transport may deliver this object as is.
        self.event = event

    @classmethod
    def of(cls, event: Event) -> OutboundMessage:
        """The message for ``event`` (body encoded lazily)."""
        return cls(None, event.type, event.key, None, event)

    @property
    def id(self) -> str:
        """The event id as text, for brokers that deduplicate or key on it."""
        if self._id is None:
            assert self.event is not None
            self._id = str(self.event.id)
        return self._id

    @property
    def body(self) -> bytes:
        """Structured-mode CloudEvents JSON (encoded once, on first access)."""
        if self._body is None:
            from agentevents.core.codec import encode_event

            assert self.event is not None
            self._body = encode_event(self.event)
        return self._body

    def __repr__(self) -> str:
        return f"OutboundMessage(id={self.id!r}, topic={self.topic!r}, key={self.key!r})"


@dataclass(slots=True, eq=False)
class InboundMessage:
    """One delivery of a message to one member; identity-compared."""

    #: The wire bytes (``None`` only when ``event`` is given).
    body: bytes | None
    #: The topic (event type) the backend received it on.
    topic: str
    #: 1 on the first delivery to the group, counting redeliveries by the broker.
    delivery_count: int = 1
    #: Already-decoded event from an in-process transport, else ``None``.
    event: Event | None = None
    #: The backend's own handle (stream entry id, JetStream message, offset, receipt).
    handle: Any = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """Everything a backend needs to create or join a consumer."""

    pattern: Pattern
    #: Durable group name, or ``None`` for an ephemeral subscriber. Any non-empty text
    #: (agents use ``"<agent_id>.<handler>"``): a backend whose broker restricts names
    #: (JetStream durables allow no dots) derives a valid, collision-free name from
    #: ``(group, pattern)``, e.g. a sanitised prefix plus a short hash.
    group: str | None
    #: Where a *new* group starts; an existing group resumes where it was.
    start: StartPosition
    #: Seconds after which an unacknowledged delivery goes to another member.
    ack_timeout: float
    #: Unique name of this member inside the group.
    consumer: str
    #: Most messages the member holds unacknowledged at once.
    max_in_flight: int
    #: Deliveries before the core dead-letters; brokers with ``max_deliver`` should allow more.
    max_attempts: int


class Receiver(ABC):
    """One member of one consumer. Methods are called from one task at a time each."""

    @abstractmethod
    async def receive(self, max_messages: int, timeout: float) -> Sequence[InboundMessage]:
        """Wait up to ``timeout`` seconds for at most ``max_messages``; return what came.

        Returns redeliveries due (unacknowledged past ``ack_timeout`` elsewhere, or handed
        back) as well as new messages. An empty sequence means nothing arrived in time. Must
        be safe to cancel and must stop promptly when cancelled (the core cancels it to stop
        a subscription, then hands back what it holds): a message lost to cancellation is
        redelivered after the timeout.
        """

    @abstractmethod
    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        """Acknowledge handled messages, as one batch where the broker allows."""

    @abstractmethod
    async def nack(self, messages: Sequence[InboundMessage], delay: float = 0.0) -> None:
        """Hand messages back for redelivery to any member after ``delay`` seconds."""

    @abstractmethod
    async def extend(self, messages: Sequence[InboundMessage]) -> None:
        """Restart the ``ack_timeout`` clock of messages that are still being handled."""

    @abstractmethod
    async def close(self) -> None:
        """Leave the consumer; unacknowledged messages are redelivered to other members."""


class Transport(ABC):
    """A bus backend: durable sending, receivers, dead letters. See the module docstring."""

    #: What this backend guarantees beyond the core contract.
    capabilities: Capabilities = Capabilities()

    @abstractmethod
    async def send(self, messages: Sequence[OutboundMessage]) -> None:
        """Publish a batch; return only after the broker durably accepted every message.

        Raise :class:`~agentevents.core.errors.PublishError` (translated from the client's
        error) if any message was not accepted; never drop one silently.
        """

    @abstractmethod
    async def open_receiver(self, spec: ConsumerSpec) -> Receiver:
        """Create (idempotently) or join the consumer ``spec`` describes; return a member.

        When this returns, the consumer exists: every matching message sent afterwards
        reaches it, including messages of types first sent later.
        """

    @abstractmethod
    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Durably store dead letters in this backend's documented dead-letter destination."""

    @abstractmethod
    async def read_dead_letters(
        self, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Oldest-first dead letters, optionally of one group only."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; receivers already closed by the core."""


def durable_name(group: str, pattern: str, *, length: int = 32,
                 unsafe: str = r"[^A-Za-z0-9_]") -> str:
    """A broker-safe, collision-free name for the consumer of ``(group, pattern)``.

    The group name with every character matching ``unsafe`` replaced by ``_`` (cut to
    ``length``, for people reading broker listings), then ``_`` and 12 hex digits of a hash
    of both ``group`` and ``pattern``: two patterns of one group are two consumers, and two
    groups that sanitise alike still differ.
    """
    digest = hashlib.sha256(f"{group}\x00{pattern}".encode()).hexdigest()[:12]
    readable = re.sub(unsafe, "_", group).strip("_")[:length]
    return f"{readable}_{digest}" if readable else digest
