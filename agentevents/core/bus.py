"""The bus every agent talks to, and the one delivery loop every backend shares.

:class:`Bus` wraps a :class:`~agentevents.core.transport.Transport`. Publishing encodes
events and waits for the broker's durable acceptance. Subscribing opens a receiver and
runs a :class:`Subscription`, which owns, for every backend alike:

* decoding (bad bytes or invalid events go to the dead-letter destination, then are acked);
* the pattern check (a backend may over-deliver; non-matching messages are acked unseen);
* per-key ordering: events with the same ``key`` run one at a time, in arrival order (a
  worker takes a key's lane and runs it to its end); events without a key, and different
  keys, run concurrently on up to ``max_in_flight`` workers;
* backpressure: at most ``max_in_flight`` messages received and not yet acknowledged;
* retries: a handler that raises is retried on the same member with exponential backoff
  up to ``max_attempts`` (counting the broker's earlier deliveries), then the event is
  dead-lettered with the error, attempt count and group, and the group moves on; a handler
  that raises :class:`~agentevents.core.errors.RejectEvent` is dead-lettered at once;
* keeping held messages alive (``Receiver.extend``) while handlers or backoffs run long;
* batched acknowledgements;
* graceful stop: stop receiving, let started handlers finish within a timeout, hand the
  rest back to the broker, flush acks, leave the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Self

from agentevents.core.codec import decode_event, encode_event
from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import (
    AgentEventsError,
    BusClosedError,
    PayloadTooLargeError,
    PublishError,
    RejectEvent,
    SubscribeError,
)
from agentevents.core.event import Event
from agentevents.core.patterns import Pattern, compile_pattern
from agentevents.core.transport import (
    Capabilities,
    ConsumerSpec,
    InboundMessage,
    OutboundMessage,
    Receiver,
    StartPosition,
    Transport,
)
from agentevents.core.urls import redact_url

__all__ = ["Bus", "Delivery", "Handler", "Subscription", "current_delivery"]

log = logging.getLogger("agentevents.bus")

#: What ``subscribe`` calls for every matching event; returning acknowledges it.
Handler = Callable[[Event], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """Facts about the delivery a handler is running for (see :func:`current_delivery`)."""

    #: 1 on the first attempt; counts the broker's redeliveries and local retries.
    attempt: int
    max_attempts: int
    group: str | None
    pattern: str

    @property
    def is_last_attempt(self) -> bool:
        """Whether failing now sends the event to the dead-letter destination."""
        return self.attempt >= self.max_attempts


_current: ContextVar[Delivery | None] = ContextVar("agentevents_delivery", default=None)


def current_delivery() -> Delivery:
    """The :class:`Delivery` of the handler call in progress (attempt number, group, ...)."""
    delivery = _current.get()
    if delivery is None:
        raise RuntimeError("current_delivery() is only available inside a bus handler")
    return delivery


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """Delivery settings of one subscription; :class:`Bus` holds the defaults."""

    max_in_flight: int = 64
    max_attempts: int = 5
    ack_timeout: float = 30.0
    retry_backoff: float = 0.1
    max_backoff: float = 10.0
    drain_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise SubscribeError("max_in_flight must be at least 1")
        if self.max_attempts < 1:
            raise SubscribeError("max_attempts must be at least 1")
        if self.ack_timeout <= 0:
            raise SubscribeError("ack_timeout must be positive (seconds)")
        for name in ("retry_backoff", "max_backoff", "drain_timeout"):
            if getattr(self, name) < 0:
                raise SubscribeError(f"{name} must not be negative (seconds)")

    @classmethod
    def merged(cls, base: SubscriptionOptions | None, options: dict[str, Any]) -> Self:
        """``base`` (or the defaults) with ``options`` applied; unknown names are errors."""
        fields = {name: getattr(base, name) for name in cls.__dataclass_fields__} if base else {}
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise SubscribeError(
                f"unknown delivery option(s): {', '.join(sorted(unknown))}; known: "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**{**fields, **options})

    def backoff(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt``: exponential, capped."""
        return float(min(self.max_backoff, self.retry_backoff * (2 ** (attempt - 1))))


class Subscription:
    """A running consumer: one member of a group, or an ephemeral subscriber.

    Created by :meth:`Bus.subscribe`; stop it with :meth:`stop` (or by closing the bus).
    """

    def __init__(
        self,
        bus: Bus,
        receiver: Receiver,
        pattern: Pattern,
        handler: Handler,
        group: str | None,
        options: SubscriptionOptions,
    ) -> None:
        self._bus = bus
        self._receiver = receiver
        self.pattern = pattern
        self.group = group
        self._handler = handler
        self._options = options
        self._in_flight = 0
        self._slot_free = asyncio.Event()
        # Work for the workers: an unkeyed message, or the key of a lane to run to its end.
        self._ready: deque[tuple[InboundMessage, Event] | str] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._waking = False  # a worker was woken (or started) and has not run yet
        self._workers: set[asyncio.Task[None]] = set()
        self._lanes: dict[str, deque[tuple[InboundMessage, Event]]] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._held: dict[InboundMessage, float] = {}
        self._now = time.monotonic()  # when the batch being dispatched was received
        self._first = Delivery(1, options.max_attempts, group, pattern.text)
        self._acks: list[InboundMessage] = []
        self._ack_wake = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Future[None] | None = None
        self._fetcher = asyncio.create_task(self._fetch_loop(), name="agentevents-fetch")
        self._fetcher.add_done_callback(self._fetcher_done)
        self._acker = asyncio.create_task(self._ack_loop(), name="agentevents-ack")
        self._keeper = asyncio.create_task(self._keep_alive_loop(), name="agentevents-keepalive")

    @property
    def active(self) -> bool:
        """True until :meth:`stop` begins (or the receive loop died, which is logged)."""
        return not self._stopping and not self._fetcher.done()

    def _fetcher_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the receive loop of %r died; the subscription receives nothing more",
                      self, exc_info=task.exception())

    # -- receiving ----------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        limit = self._options.max_in_flight
        while not self._stopping:
            free = limit - self._in_flight
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                messages = await self._receiver.receive(free, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("receive failed for %r (group %r); retrying in 1 s",
                              self.pattern.text, self.group)
                await asyncio.sleep(1.0)
                continue
            self._now = time.monotonic()
            for message in messages:
                self._in_flight += 1
                try:
                    self._dispatch(message)
                except Exception as exc:  # never let one message stop the consumer
                    log.exception("could not dispatch a message on %r; dead-lettering it",
                                  message.topic)
                    self._track(message)
                    self._spawn(self._dead_letter(message, None, exc, message.delivery_count))
            if self._ready:
                self._wake_worker()

    def _dispatch(self, message: InboundMessage) -> None:
        event = message.event
        if event is None:
            try:
                event = decode_event(message.body or b"")
            except Exception as exc:  # EventValidationError, or anything a broken body causes
                self._track(message)
                self._spawn(self._dead_letter(message, None, exc, message.delivery_count))
                return
        if not self.pattern.matches(event.type):
            self._finish(message)
            return
        self._track(message)
        key = event.key
        if key is None:
            self._ready.append((message, event))
            return
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append((message, event))
            return
        self._lanes[key] = deque([(message, event)])
        self._ready.append(key)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    def _track(self, message: InboundMessage) -> None:
        self._held[message] = self._now

    # -- handling -----------------------------------------------------------------------

    def _wake_worker(self) -> None:
        """Wake one idle worker, or start one while fewer than ``max_in_flight`` exist.

        Workers wake each other in a chain: a worker that takes an item while more are
        queued wakes the next, and only while no woken worker is still waiting to run. So a
        burst costs one wake-up per worker that actually gets to work, not one per message:
        fast handlers drain a batch on one worker, slow ones (that await) fan out to
        ``max_in_flight`` concurrent workers.
        """
        if self._waking:
            return
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking = True
                return
        if len(self._workers) < self._options.max_in_flight:
            task = asyncio.create_task(self._worker(), name="agentevents-worker")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
            self._waking = True

    async def _worker(self) -> None:
        queue = self._ready
        loop = asyncio.get_running_loop()
        self._waking = False  # started: the next wake-up may go to another worker
        while True:
            if not queue:
                if self._stopping:
                    return
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                await waiter
                self._waking = False
                continue
            item = queue.popleft()
            if queue:
                self._wake_worker()
            if isinstance(item, str):
                await self._run_lane(item)
            else:
                await self._handle(*item)

    async def _run_lane(self, key: str) -> None:
        lane = self._lanes[key]
        try:
            while lane:
                message, event = lane[0]
                await self._handle(message, event)
                lane.popleft()
        finally:
            del self._lanes[key]

    async def _handle(self, message: InboundMessage, event: Event) -> None:
        options = self._options
        attempt = message.delivery_count
        if attempt > 2 * options.max_attempts:
            # Delivered far more often than allowed without ever being settled: the members
            # that took it died with it (a poison message that crashes its process). Stop
            # here. The margin is for hand-backs at graceful stops, which brokers count too.
            await self._dead_letter(message, event, RuntimeError(
                f"delivered {attempt} times without being acknowledged (max_attempts "
                f"{options.max_attempts}); the members handling it may have crashed"), attempt)
            return
        while True:
            delivery = self._first if attempt == 1 else Delivery(
                attempt, options.max_attempts, self.group, self.pattern.text)
            token = _current.set(delivery)
            try:
                await self._handler(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt >= options.max_attempts or isinstance(exc, RejectEvent):
                    await self._dead_letter(message, event, exc, attempt)
                    return
                log.info("handler failed on %s %s (attempt %d of %d), retrying: %r",
                         event.type, event.id, attempt, options.max_attempts, exc)
                await asyncio.sleep(options.backoff(attempt))
                attempt += 1
                continue
            finally:
                _current.reset(token)
            self._finish(message)
            return

    async def _dead_letter(
        self, message: InboundMessage, event: Event | None, exc: BaseException, attempts: int
    ) -> None:
        body = message.body if message.body is not None else encode_event(event)  # type: ignore[arg-type]
        text, is_b64 = DeadLetter.encode_body(body)
        letter = DeadLetter(
            group=self.group,
            pattern=self.pattern.text,
            topic=message.topic,
            event_id=str(event.id) if event is not None else None,
            event_type=event.type if event is not None else None,
            error=str(exc) or repr(exc),
            error_type=type(exc).__qualname__,
            attempts=attempts,
            body=text,
            body_base64=is_b64,
        )
        delay = self._options.retry_backoff or 0.1
        while True:  # the message stays held (and its key's lane blocked) until stored
            try:
                await self._bus.transport.dead_letter([letter])
                break
            except Exception:
                if self._stopping:
                    log.exception("could not dead-letter a message on %r while stopping; it "
                                  "is handed back to the broker", message.topic)
                    return  # still held: stop() hands it back
                log.exception("could not dead-letter a message on %r; retrying in %.1f s",
                              message.topic, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._options.max_backoff or delay)
        log.warning("dead-lettered %s on %r (group %r) after %d attempt(s): %s",
                    letter.event_id or "undecodable message", message.topic, self.group,
                    attempts, letter.error)
        self._finish(message)

    def _finish(self, message: InboundMessage) -> None:
        self._held.pop(message, None)
        self._acks.append(message)
        self._ack_wake.set()
        self._release()

    def _release(self) -> None:
        self._in_flight -= 1
        self._slot_free.set()

    # -- acknowledging and keeping alive ------------------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            await self._flush_acks()
            if self._stopping and not self._acks:
                return  # stop() woke us for a last flush

    async def _flush_acks(self) -> None:
        while self._acks:
            batch, self._acks = self._acks, []
            try:
                await self._receiver.ack(batch)
            except asyncio.CancelledError:
                self._acks[:0] = batch
                raise
            except Exception:
                log.exception("ack of %d message(s) failed; the broker will redeliver them",
                              len(batch))

    async def _keep_alive_loop(self) -> None:
        """Extend the messages handlers hold, so none outlives its ``ack_timeout``.

        Wakes every quarter of ``ack_timeout`` and extends what has been held (or last
        extended) for at least half of that: a message is first extended within 3/8 of
        ``ack_timeout`` of being taken and then every quarter, leaving the broker's timer
        well over half of its time as slack for a slow event loop.
        """
        period = self._options.ack_timeout / 4
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - period / 2
            old = [m for m, since in self._held.items() if since <= cutoff]
            if not old:
                continue
            try:
                await self._receiver.extend(old)
            except Exception:
                log.exception("could not extend %d held message(s)", len(old))
                continue
            now = time.monotonic()
            for message in old:
                if message in self._held:
                    self._held[message] = now

    # -- stopping -----------------------------------------------------------------------

    async def stop(self, timeout: float | None = None) -> None:
        """Stop receiving, let started handlers finish, hand back the rest, leave.

        Handlers still running after ``timeout`` seconds (default: the subscription's
        ``drain_timeout``) are cancelled and their messages handed back for redelivery.
        Safe to call more than once, concurrently, from a handler of this subscription, or
        from a task that gets cancelled: the stopping itself always runs to its end.
        """
        if self._stop_task is None:
            limit = self._options.drain_timeout if timeout is None else timeout
            self._stop_task = asyncio.ensure_future(self._stop(limit))
        if asyncio.current_task() in self._handler_tasks():
            return  # called from our own handler: it finishes, then the stop completes
        await asyncio.shield(self._stop_task)

    def _handler_tasks(self) -> set[asyncio.Task[None]]:
        return self._workers | self._lane_tasks

    async def _stop(self, timeout: float) -> None:
        self._stopping = True
        try:
            self._fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetcher
            # Queued work that no handler has started is dropped from the queues (it is
            # still held, so it is handed back below); each key lane keeps only its head,
            # which may be running already and is let finish. Idle workers are released.
            self._ready.clear()
            for lane in self._lanes.values():
                while len(lane) > 1:
                    lane.pop()
            while self._idle:
                waiter = self._idle.popleft()
                if not waiter.done():
                    waiter.set_result(None)
            busy = list(self._handler_tasks())
            if busy:
                _done, pending = await asyncio.wait(busy, timeout=timeout)
                for task in pending:
                    task.cancel()
                if pending:  # bounded: a handler that swallows cancellation is abandoned
                    await asyncio.wait(pending, timeout=1.0)
            unstarted = list(self._held)
            self._held.clear()
            # The ack loop ends after a last flush rather than being cancelled mid-ack: some
            # client libraries swallow a cancellation inside a network call. Both helpers
            # are waited for with a bound, so such a library cannot hang stop().
            self._keeper.cancel()
            self._ack_wake.set()
            _done, stuck = await asyncio.wait([self._keeper, self._acker], timeout=timeout)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)
            try:
                await self._flush_acks()
                if unstarted:
                    await self._receiver.nack(unstarted, 0.0)
            except Exception:
                log.exception("could not settle messages while stopping; they will be "
                              "redelivered after ack_timeout")
            with contextlib.suppress(Exception):
                await self._receiver.close()
        finally:
            self._bus._forget(self)
            self._stopped.set()

    def __repr__(self) -> str:
        state = "active" if self.active else "stopped"
        return f"<Subscription {self.pattern.text!r} group={self.group!r} {state}>"


class Bus:
    """Publish and subscribe to events; the same object whatever the backend.

    Build one with :func:`agentevents.create_bus` (a URL picks the backend) or directly
    from a transport. ``options`` are defaults for every :meth:`subscribe` call.
    """

    def __init__(self, transport: Transport, *, url: str | None = None, **options: Any) -> None:
        self.transport = transport
        self._url = url
        self._defaults = SubscriptionOptions.merged(None, options)
        self._subscriptions: set[Subscription] = set()
        self._closing = False  # no new subscriptions; publishing still works while draining
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None

    @property
    def capabilities(self) -> Capabilities:
        """What the backend guarantees beyond the core contract."""
        return self.transport.capabilities

    def _encode(self, event: Event) -> OutboundMessage:
        message = OutboundMessage.of(event)
        # Read per publish: a transport may learn its server's limit only once connected.
        limit = self.transport.capabilities.max_payload_bytes
        if limit is not None and len(message.body) > limit:
            raise PayloadTooLargeError(message.id, len(message.body), limit)
        return message

    async def publish(self, event: Event) -> None:
        """Publish one event; returns once the broker durably accepted it.

        Raises :class:`PublishError` (or :class:`PayloadTooLargeError`) otherwise.
        """
        await self._send([self._encode(event)])

    async def publish_many(self, events: Iterable[Event]) -> None:
        """Publish a batch (pipelined where the broker allows); all accepted, or it raises.

        On :class:`PublishError` some events may have been accepted: publishing them again
        is safe, ids are idempotency keys.
        """
        messages = [self._encode(event) for event in events]
        if messages:
            await self._send(messages)

    async def _send(self, messages: Sequence[OutboundMessage]) -> None:
        if self._closed:
            raise BusClosedError("this bus is closed; create a new one to publish")
        try:
            await self.transport.send(messages)
        except AgentEventsError:
            raise
        except Exception as exc:  # a backend forgot to translate: never let it escape raw
            raise PublishError(
                f"publishing to {self!r} failed: {exc!r}; the event(s) may be retried safely"
            ) from exc

    async def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        group: str | None = None,
        start: StartPosition = "latest",
        consumer: str | None = None,
        **options: Any,
    ) -> Subscription:
        """Call ``handler`` for every event whose type matches ``pattern``.

        ``group=None`` subscribes ephemerally (events published while subscribed);
        ``group="name"`` joins a durable group: every group gets every event, members of
        one group share them. ``start`` applies to a group seen for the first time.
        ``options`` override this bus's delivery defaults (``max_in_flight``,
        ``max_attempts``, ``ack_timeout``, ``retry_backoff``, ``max_backoff``,
        ``drain_timeout``). Returns once the consumer exists on the broker.
        """
        if self._closing:
            raise BusClosedError("this bus is closed; create a new one to subscribe")
        compiled = compile_pattern(pattern)
        if group is not None and not group:
            raise SubscribeError("group must be a non-empty name, or None for ephemeral")
        if start not in ("latest", "earliest"):
            raise SubscribeError(f"start must be 'latest' or 'earliest', not {start!r}")
        settings = self._defaults
        if options:
            settings = SubscriptionOptions.merged(settings, options)
        spec = ConsumerSpec(
            pattern=compiled,
            group=group,
            start=start,
            ack_timeout=settings.ack_timeout,
            consumer=consumer or f"member-{uuid.uuid4().hex[:12]}",
            max_in_flight=settings.max_in_flight,
            max_attempts=settings.max_attempts,
        )
        try:
            receiver = await self.transport.open_receiver(spec)
        except AgentEventsError:
            raise
        except Exception as exc:
            raise SubscribeError(
                f"could not subscribe to {pattern!r} on {self!r}: {exc!r}"
            ) from exc
        if self._closing:  # closed while the consumer was being created
            with contextlib.suppress(Exception):
                await receiver.close()
            raise BusClosedError("this bus was closed while subscribing")
        subscription = Subscription(self, receiver, compiled, handler, group, settings)
        self._subscriptions.add(subscription)
        return subscription

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Oldest-first dead letters from the backend's dead-letter destination."""
        return await self.transport.read_dead_letters(group, limit)

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    async def close(self, timeout: float | None = None) -> None:
        """Stop every subscription, draining in-flight handlers (up to ``timeout``, default
        each subscription's ``drain_timeout``), then release the backend's connections.

        Handlers may still publish while they drain. Idempotent; a concurrent second call
        waits for the first to finish.
        """
        if self._close_task is None:
            self._closing = True
            self._close_task = asyncio.ensure_future(self._close(timeout))
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float | None) -> None:
        try:
            results = await asyncio.gather(
                *(sub.stop(timeout) for sub in list(self._subscriptions)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.error("a subscription did not stop cleanly while closing %r", self,
                              exc_info=result)
        finally:
            self._closed = True
            await self.transport.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        where = redact_url(self._url) if self._url else type(self.transport).__name__
        return f"<Bus {where}>"
