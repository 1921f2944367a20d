"""The in-memory bus backend (``memory://``, ``memory://name``): the embedded default.

It is the reference transport: it passes the whole conformance suite. One in-process
broker exists per name (``memory://`` is the broker named ``default``), so several
:class:`~agentevents.core.bus.Bus` objects in one process are members of the same groups,
the way processes are on a real broker. Nothing survives the process.

Model (deliberately the same as Redis Streams / JetStream): one append-only log of every
message; a consumer (a durable group, or an ephemeral subscriber) has a cursor into it, a
pending list of delivered-but-unacknowledged entries with a deadline (``ack_timeout``), and
a queue of handed-back entries. A receive returns expired pending entries first (their
member vanished), then handed-back entries that are due, then new matching entries.
Events with a key stick to one member of a group while that member holds any of them
unacknowledged: the key's later entries go to the same member (whose core keeps them in
order) or wait in the key's backlog until the member has settled them all. So per-key
order holds in a group of many members too (``ordered_per_key``), and a group with one
member never waits. A handed-back (nacked) keyed entry goes to the front of its key's
backlog, ahead of the key's later entries.

Events are delivered as the very :class:`~agentevents.core.event.Event` objects published
(immutable models; nothing is copied or encoded). Their ``payload`` and ``metadata`` are
plain dicts shared by every group: handlers must treat them as read-only, as they would a
message from any broker.

URL options: ``?max_payload_bytes=N`` (default: no limit, events never leave the process
and are never encoded; set it to your production broker's limit, e.g. 1048576 for NATS, to
catch oversize events early) and ``?max_retained=N`` (default unlimited: trim the oldest
entries beyond N; groups that had not read them skip them, as with a capped Redis stream).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from agentevents.core.errors import ConfigurationError, SubscribeError
from agentevents.core.transport import (
    Capabilities,
    ConsumerSpec,
    InboundMessage,
    OutboundMessage,
    Receiver,
    Transport,
)
from agentevents.plugins.hookspecs import BackendInfo, hookimpl

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agentevents.core.deadletter import DeadLetter
    from agentevents.core.event import Event
    from agentevents.core.patterns import Pattern

__all__ = ["MemoryBroker", "MemoryTransport", "agentevents_bus_backends"]



@dataclass(slots=True)
class _Entry:
    seq: int
    topic: str
    key: str | None
    body: bytes | None  # only for raw messages; events travel as objects
    event: Event | None


@dataclass(slots=True)
class _Pending:
    entry: _Entry
    consumer: str
    deadline: float
    count: int


@dataclass(slots=True)
class _Consumer:
    """One durable group or ephemeral subscriber: cursor, pending list, handed-back queue."""

    pattern: Pattern
    cursor: int
    ephemeral: bool
    pending: dict[int, _Pending] = field(default_factory=dict)
    #: Unkeyed entries handed back: (due time, entry, delivery count).
    handed_back: list[tuple[float, _Entry, int]] = field(default_factory=list)
    #: key -> [member holding it, how many of its entries that member holds].
    key_owner: dict[str, list[Any]] = field(default_factory=dict)
    #: key -> entries waiting for the key to be free or theirs: (due, entry, count).
    key_backlog: dict[str, deque[tuple[float, _Entry, int]]] = field(default_factory=dict)
    members: int = 0


class MemoryBroker:
    """A named in-process broker: the shared state behind every ``memory://name`` bus."""

    def __init__(self, name: str, max_retained: int | None = None) -> None:
        self.name = name
        self.max_retained = max_retained
        self.log: list[_Entry] = []
        self.offset = 0  # seq of log[0]; grows when trimming
        self.next_seq = 0
        self.consumers: dict[tuple[str, str], _Consumer] = {}
        self.dead: list[DeadLetter] = []
        self._waiters: set[asyncio.Future[None]] = set()

    def append(self, messages: Sequence[OutboundMessage]) -> None:
        for message in messages:
            event = message.event
            self.log.append(_Entry(self.next_seq, message.topic, message.key,
                                   message.body if event is None else None, event))
            self.next_seq += 1
        if self.max_retained is not None and len(self.log) > self.max_retained:
            drop = len(self.log) - self.max_retained
            del self.log[:drop]
            self.offset += drop
        self.wake()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                loop = waiter.get_loop()
                if loop.is_closed():
                    continue
                loop.call_soon_threadsafe(_resolve, waiter)

    async def wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_brokers: dict[str, MemoryBroker] = {}


def get_broker(name: str = "default", max_retained: int | None = None) -> MemoryBroker:
    """The process-wide broker called ``name`` (created on first use)."""
    broker = _brokers.get(name)
    if broker is None:
        broker = _brokers[name] = MemoryBroker(name, max_retained)
    return broker


class MemoryReceiver(Receiver):
    """One member of a consumer on a :class:`MemoryBroker`."""

    def __init__(
        self, broker: MemoryBroker, key: tuple[str, str], name: str, ack_timeout: float
    ) -> None:
        self._broker = broker
        # Each member's own ack_timeout: the core keeps a message alive well within the
        # member's value, so the broker must time out at that member's value too.
        self._ack_timeout = ack_timeout
        self._key = key
        self._consumer = broker.consumers[key]
        self._name = name
        self._closed = False

    def _deliver(self, entry: _Entry, count: int, now: float) -> InboundMessage:
        consumer = self._consumer
        consumer.pending[entry.seq] = _Pending(entry, self._name, now + self._ack_timeout,
                                               count)
        key = entry.key
        if key is not None:
            owner = consumer.key_owner.get(key)
            if owner is None:
                consumer.key_owner[key] = [self._name, 1]
            else:
                owner[0] = self._name
                owner[1] += 1
        return InboundMessage(entry.body, entry.topic, count, entry.event, entry.seq)

    def _free_for_me(self, key: str) -> bool:
        owner = self._consumer.key_owner.get(key)
        return owner is None or owner[0] == self._name

    def _collect(self, limit: int) -> list[InboundMessage]:
        consumer = self._consumer
        broker = self._broker
        now = time.monotonic()
        out: list[InboundMessage] = []
        if consumer.pending:
            for pending in list(consumer.pending.values()):
                if len(out) >= limit:
                    return out
                if pending.deadline <= now:  # its member vanished: redeliver here
                    key = pending.entry.key
                    if key is not None:  # the vanished member's key is ours now
                        consumer.key_owner[key][1] -= 1
                    out.append(self._deliver(pending.entry, pending.count + 1, now))
        if consumer.key_backlog:
            for key, backlog in list(consumer.key_backlog.items()):
                if not self._free_for_me(key):
                    continue
                while backlog and len(out) < limit and backlog[0][0] <= now:
                    _due, entry, count = backlog.popleft()
                    out.append(self._deliver(entry, count, now))
                if not backlog:
                    del consumer.key_backlog[key]
        if consumer.handed_back:
            due = [item for item in consumer.handed_back if item[0] <= now]
            for item in due[: limit - len(out)]:
                consumer.handed_back.remove(item)
                out.append(self._deliver(item[1], item[2], now))
        if consumer.cursor < broker.offset:
            consumer.cursor = broker.offset  # trimmed away before this group read it
        log = broker.log
        base = broker.offset
        matches = consumer.pattern.matches
        backlogs = consumer.key_backlog
        while len(out) < limit and consumer.cursor < broker.next_seq:
            entry = log[consumer.cursor - base]
            consumer.cursor += 1
            if not matches(entry.topic):
                continue
            key = entry.key
            if key is not None and (key in backlogs or not self._free_for_me(key)):
                backlogs.setdefault(key, deque()).append((0.0, entry, 1))
                continue
            out.append(self._deliver(entry, 1, now))
        return out

    def _next_due(self) -> float | None:
        consumer = self._consumer
        times = [p.deadline for p in consumer.pending.values()]
        times.extend(item[0] for item in consumer.handed_back)
        times.extend(b[0][0] for k, b in consumer.key_backlog.items() if self._free_for_me(k))
        return min(times) if times else None

    async def receive(self, max_messages: int, timeout: float) -> Sequence[InboundMessage]:
        deadline = time.monotonic() + timeout
        while not self._closed:
            out = self._collect(max_messages)
            if out:
                return out
            now = time.monotonic()
            wait = deadline - now
            if wait <= 0:
                return out
            due = self._next_due()
            if due is not None:
                wait = min(wait, max(due - now, 0.001))
            await self._broker.wait(wait)
        return []

    def _settle(self, message: InboundMessage) -> _Pending | None:
        """Drop a delivery from the pending list; returns it, or None if already settled."""
        consumer = self._consumer
        pending = consumer.pending.pop(message.handle, None)
        if pending is None:
            return None  # already settled, or reassigned and settled by another member
        key = pending.entry.key
        if key is not None:
            owner = consumer.key_owner[key]
            owner[1] -= 1
            if owner[1] <= 0:
                del consumer.key_owner[key]
        return pending

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        backlogs = self._consumer.key_backlog
        freed = False
        for message in messages:
            pending = self._settle(message)
            freed = freed or (pending is not None and pending.entry.key in backlogs)
        if freed:
            self._broker.wake()

    async def nack(self, messages: Sequence[InboundMessage], delay: float = 0.0) -> None:
        consumer = self._consumer
        due = time.monotonic() + delay
        keyed: list[_Pending] = []
        for message in messages:
            pending = self._settle(message)
            if pending is None:
                continue
            if pending.entry.key is None:
                consumer.handed_back.append((due, pending.entry, pending.count + 1))
            else:
                keyed.append(pending)
        # A key's handed-back entries go back in front of its later ones, oldest first.
        for pending in sorted(keyed, key=lambda p: p.entry.seq, reverse=True):
            key = pending.entry.key
            assert key is not None
            consumer.key_backlog.setdefault(key, deque()).appendleft(
                (due, pending.entry, pending.count + 1)
            )
        consumer.handed_back.sort(key=lambda item: (item[0], item[1].seq))
        self._broker.wake()

    async def extend(self, messages: Sequence[InboundMessage]) -> None:
        consumer = self._consumer
        deadline = time.monotonic() + self._ack_timeout
        for message in messages:
            pending = consumer.pending.get(message.handle)
            if pending is not None and pending.consumer == self._name:
                pending.deadline = deadline

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        consumer = self._consumer
        consumer.members -= 1
        if consumer.ephemeral:
            self._broker.consumers.pop(self._key, None)
        self._broker.wake()


class MemoryTransport(Transport):
    """The in-memory transport; see the module docstring."""

    def __init__(
        self,
        name: str = "default",
        *,
        max_payload_bytes: int | None = None,
        max_retained: int | None = None,
    ) -> None:
        self.broker = get_broker(name, max_retained)
        self.capabilities = Capabilities(
            ordered_per_key=True,
            durable_groups=True,
            replay=True,
            broker_dedupe=False,
            cross_process=False,
            max_payload_bytes=max_payload_bytes,
        )
        self._ephemeral = 0

    @classmethod
    def from_url(cls, url: str) -> MemoryTransport:
        """``memory://[name][?max_payload_bytes=N&max_retained=N]``."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            limit = query.pop("max_payload_bytes", None)
            max_payload = int(limit) if limit is not None else None
            retained = query.pop("max_retained", None)
            max_retained = int(retained) if retained is not None else None
        except ValueError as exc:
            raise ConfigurationError(f"memory bus URL {url!r}: {exc}") from exc
        if query:
            raise ConfigurationError(
                f"memory bus URL {url!r}: unknown option(s) {', '.join(sorted(query))}; "
                "known: max_payload_bytes, max_retained"
            )
        return cls(parts.netloc or "default", max_payload_bytes=max_payload,
                   max_retained=max_retained)

    async def send(self, messages: Sequence[OutboundMessage]) -> None:
        self.broker.append(messages)

    async def open_receiver(self, spec: ConsumerSpec) -> Receiver:
        broker = self.broker
        if spec.group is None:
            self._ephemeral += 1
            key = (f"~ephemeral-{id(self)}-{self._ephemeral}", spec.pattern.text)
            broker.consumers[key] = _Consumer(spec.pattern, broker.next_seq,
                                              ephemeral=True)
        else:
            key = (spec.group, spec.pattern.text)
            if key not in broker.consumers:
                cursor = broker.offset if spec.start == "earliest" else broker.next_seq
                broker.consumers[key] = _Consumer(spec.pattern, cursor,
                                                  ephemeral=False)
            elif broker.consumers[key].ephemeral:  # pragma: no cover - names cannot clash
                raise SubscribeError(f"group name {spec.group!r} is reserved")
        broker.consumers[key].members += 1
        return MemoryReceiver(broker, key, spec.consumer, spec.ack_timeout)

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self.broker.dead.extend(letters)

    async def read_dead_letters(
        self, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        letters = [d for d in self.broker.dead if group is None or d.group == group]
        return letters[:limit]

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.broker.name!r}>"


@hookimpl
def agentevents_bus_backends() -> list[BackendInfo]:
    """The in-memory bus: ``memory://`` and ``memory://name``."""
    return [
        BackendInfo(
            name="memory",
            kind="bus",
            schemes=("memory",),
            factory=MemoryTransport.from_url,
            description="in-process broker, the embedded default (reference implementation)",
        )
    ]
