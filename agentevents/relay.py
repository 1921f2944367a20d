"""The outbox relay: publishes what a store recorded for publication, in order, at least once.

A store with the transactional outbox on (:class:`~agentevents.core.outbox.Outbox`)
records every appended event for publication in the append's own transaction. The
:class:`OutboxRelay` moves them to a bus::

    store = create_store("postgresql+asyncpg://...?outbox=true")
    bus = create_bus("redis://...")
    relay = OutboxRelay(store, bus)
    await relay.run()            # until relay.stop()

or, as a process of its own: ``agentevents relay --store URL --bus URL``.

One step (:meth:`OutboxRelay.run_once`):

1. take or renew the relay lease (one active relay; the others stand by);
2. read the oldest ``batch_size`` events of the outbox, in global position order;
3. ``await bus.publish_many(events)``, which returns only once the broker acknowledged
   every event, renewing the lease every ``lease_ttl / 3`` for as long as that takes;
4. mark them published (delete them from the outbox), fenced by the lease.

Guarantees and their limits:

* **At least once.** Events leave the outbox only after the bus acknowledged them. A relay
  that crashes (even SIGKILL) between 3 and 4, or a bus that accepted part of a batch
  before failing, means that batch is published again by the next step or the next
  relay: consumers can receive an event twice. The copies have the same event id, the
  idempotency key: deduplicate on it (brokers with publish dedupe, such as JetStream's
  ``Nats-Msg-Id``, drop them themselves).
* **Order.** Batches are published one after the other in global position order (the
  next only once the previous one was acknowledged and marked), so the events of a stream
  reach the bus in version order. After a crash the unfinished batch is published again:
  those copies arrive after events that followed them, but they are duplicates; the
  *first* copy of every event arrives in order (given a bus that applies a batch in order,
  as every built-in one does; on Redis a key's events of different types live in
  different Redis streams, which a member merges by publish stamp: see
  ``docs/architecture.md``).
* **One active relay.** Run as many relay processes as you like with the same ``name``:
  the lease (``lease_ttl``, renewed every ``lease_ttl / 3``, also while a slow bus is
  publishing a batch and while a failed one waits to be retried) lets one publish; the
  others check every ``lease_ttl / 4`` and one takes over once a dead relay's lease expires
  (a relay that stops cleanly releases it at once). A relay that finds its lease lost
  while publishing (taken over, or not renewable before it expires: the store cannot be
  reached) cancels the publish, marks nothing and stands by. The lease's fence stops a
  relay that lost its lease without noticing (the whole process stalled, the others took
  over) from marking anything published: it gets
  :class:`~agentevents.core.errors.LeaseLostError` and goes back to standby.
* **One name per outbox.** The outbox is one queue, relayed under one ``name``: a relay of
  another name is refused (:class:`~agentevents.core.errors.RelayNameError`, which ends
  :meth:`OutboxRelay.run`), even when no relay of the first name is running. Relays of
  two names would each remove what the others published, and each bus would get only part
  of the events. To feed several buses, relay to one bus and bridge it to the others, or
  give each bus an outbox of its own (another store or table prefix). To rename the relay,
  stop its relays and delete the old lease (a SQL store's ``{prefix}relay_lease`` row).
* **Errors.** A failed publish or a store that cannot be reached is retried with backoff
  (``retry_backoff`` doubling up to ``max_backoff``), logged each time, forever: nothing is
  skipped. An event the bus can never accept (e.g. larger than its payload limit) therefore
  stops the relay at that event, loudly, until it is dealt with.
  While active, a relay keeps renewing its lease during the backoff, so retrying a failing
  bus never hands the lease to a standby. Configuration errors (a store without the
  outbox, a relay name other than the outbox's) and a closed store or bus end
  :meth:`OutboxRelay.run` with the error.
* **A stored event that cannot be read** (its row was changed or damaged outside
  agentevents: a payload that is not JSON, an id that is not a UUID, ...) is not skipped
  and not retried: the relay publishes the events before it, then :meth:`OutboxRelay.run`
  ends with :class:`~agentevents.core.errors.CorruptEventError`, which names its position
  and says how to repair it or take it out of the outbox. Retrying could not help, and
  skipping it would lose it without anyone noticing; every relay of the outbox stops at the
  same event, so the outage shows, and the lease is released.
* **Names.** ``name`` is 1 to :data:`MAX_NAME_LENGTH` characters and ``owner`` 1 to
  :data:`MAX_OWNER_LENGTH` (what the SQL store's lease table holds), checked when the relay
  is made, before any store call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from typing import TYPE_CHECKING, Final

from agentevents.core.errors import (
    AgentEventsError,
    BusClosedError,
    ConfigurationError,
    CorruptEventError,
    LeaseLostError,
    OutboxNotEnabledError,
    StoreClosedError,
)
from agentevents.core.outbox import Lease, Outbox

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from agentevents.core.bus import Bus
    from agentevents.core.store import EventStore

__all__ = [
    "DEFAULT_LEASE_TTL",
    "MAX_NAME_LENGTH",
    "MAX_OWNER_LENGTH",
    "OutboxRelay",
    "check_relay_names",
]

log = logging.getLogger("agentevents.relay")

#: Seconds a relay lease lasts unless renewed: a standby takes over this long after the
#: active relay died without releasing it.
DEFAULT_LEASE_TTL: Final = 10.0
#: The first idle wait, in seconds, doubled up to ``idle_timeout`` while nothing comes.
FIRST_IDLE_WAIT: Final = 0.02
#: The longest relay (lease) name and owner, in characters: what every built-in store
#: holds (the SQL store's ``relay_lease`` columns).
MAX_NAME_LENGTH: Final = 64
MAX_OWNER_LENGTH: Final = 128

#: Errors after which :meth:`OutboxRelay.run` ends instead of retrying.
_FATAL = (ConfigurationError, StoreClosedError, BusClosedError, CorruptEventError)


def check_relay_names(name: str, owner: str | None = None) -> None:
    """Raise :class:`~agentevents.core.errors.ConfigurationError` unless ``name`` (and
    ``owner``, if given) have a length a relay lease can hold, saying the limit."""
    for what, value, limit in (("name", name, MAX_NAME_LENGTH),
                               ("owner", owner, MAX_OWNER_LENGTH)):
        if value is not None and not 0 < len(value) <= limit:
            raise ConfigurationError(
                f"the relay {what} {value[:80]!r}{'...' if len(value) > 80 else ''} is "
                f"{len(value)} characters long: a relay {what} must be 1 to {limit} "
                "characters long"
            )


class OutboxRelay:
    """Publishes the events in ``store``'s outbox to ``bus`` (see the module docstring).

    ``store`` must implement :class:`~agentevents.core.outbox.Outbox` with the outbox
    turned on. ``name`` names the lease the relays of one store share (one name per
    outbox: another one raises :class:`~agentevents.core.errors.RelayNameError`); ``owner``
    identifies this relay in the lease (default: name, host, pid and a random suffix;
    it must be unique per relay instance); at most :data:`MAX_NAME_LENGTH` and
    :data:`MAX_OWNER_LENGTH` characters. ``batch_size`` events are published per
    batch. ``lease_ttl`` is how long the lease lasts unless renewed. While the outbox is
    empty the relay waits for appends (:meth:`~agentevents.core.store.EventStore.wait_for_append`,
    immediate on PostgreSQL) or polls, backing off up to ``idle_timeout`` seconds.
    """

    def __init__(
        self,
        store: EventStore,
        bus: Bus,
        *,
        name: str = "default",
        owner: str | None = None,
        batch_size: int = 100,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        idle_timeout: float = 1.0,
        retry_backoff: float = 0.1,
        max_backoff: float = 10.0,
    ) -> None:
        if not isinstance(store, Outbox):
            raise ConfigurationError(
                f"{store!r} has no transactional outbox, so there is nothing to relay: use a "
                "store that implements agentevents.core.outbox.Outbox (the memory and SQL "
                "stores do) with '?outbox=true'"
            )
        if not store.outbox_enabled:
            raise OutboxNotEnabledError(repr(store))
        check_relay_names(name, owner or None)
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size}")
        if lease_ttl <= 0 or idle_timeout <= 0:
            raise ConfigurationError(
                f"lease_ttl ({lease_ttl}) and idle_timeout ({idle_timeout}) must be positive"
            )
        self._store = store
        self._outbox: Outbox = store
        self._bus = bus
        self.name = name
        self.owner = owner or _default_owner(name)
        self.batch_size = batch_size
        self.lease_ttl = lease_ttl
        self.idle_timeout = min(idle_timeout, lease_ttl / 3)
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        #: Events published (and then marked published) by this relay, duplicates included.
        self.published = 0
        self._lease: Lease | None = None
        self._renewed_at = 0.0  # time.monotonic() of the last successful take/renew
        self._idle_head = 0
        self._stop_requested = False
        self._stop_event: asyncio.Event | None = None

    def __repr__(self) -> str:
        state = f"active, fence {self._lease.fence}" if self._lease else "standby"
        return f"<OutboxRelay {self.name!r} owner={self.owner!r} {state}>"

    @property
    def lease(self) -> Lease | None:
        """The lease this relay holds, as far as it knows; ``None`` while standing by."""
        return self._lease

    @property
    def active(self) -> bool:
        """Whether this relay holds the lease (it is the one publishing)."""
        return self._lease is not None

    # -- one step -------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Take or renew the lease, publish the next batch, mark it published.

        Returns how many events were published: 0 when the outbox is empty or another
        relay holds the lease. Raises what failed (the batch stays in the outbox);
        :class:`~agentevents.core.errors.LeaseLostError` when the lease was taken over, or
        could not be renewed while the batch was being published (the publish is then
        cancelled, and nothing is marked).
        """
        lease = await self._hold_lease()
        if lease is None:
            return 0
        # The head before the read: an append committed after it is above it, so the idle
        # wait (on head) wakes for it; anything committed before it is in this read.
        head = await self._store.head_position()
        batch = await self._outbox.read_outbox(self.batch_size)
        if not batch:
            self._idle_head = head
            return 0
        # However long the bus takes (a failover, throttling), the lease is renewed meanwhile.
        publishing = asyncio.ensure_future(
            self._bus.publish_many([recorded.event for recorded in batch]))
        await self._renewing(lease, publishing)
        try:
            await self._outbox.mark_published(lease, [recorded.position for recorded in batch])
        except LeaseLostError:
            self._lease = None
            raise
        self.published += len(batch)
        return len(batch)

    async def _hold_lease(self) -> Lease | None:
        """The lease, renewed once a third of its time has passed; None if another has it."""
        now = time.monotonic()
        if self._lease is not None and now - self._renewed_at < self.lease_ttl / 3:
            return self._lease
        had = self._lease
        lease = await self._outbox.acquire_relay_lease(self.name, self.owner, self.lease_ttl)
        self._lease = lease
        if lease is not None:
            self._renewed_at = now
            if had is None or had.fence != lease.fence:
                log.info("relay %r (%s) is active: it holds the outbox lease (fence %d)",
                         self.name, self.owner, lease.fence)
        elif had is not None:
            log.warning("relay %r (%s) lost the outbox lease to another relay; standing by",
                        self.name, self.owner)
        return lease

    async def _renewing(self, lease: Lease, work: asyncio.Future[None]) -> None:
        """Await ``work`` (a publish, a backoff), renewing ``lease`` every ``lease_ttl / 3``.

        Once the lease is lost (another relay took it over, or it could not be renewed
        before it expired), cancels ``work`` and raises
        :class:`~agentevents.core.errors.LeaseLostError`: this relay must stop publishing at
        once, so that two relays never publish side by side. ``work``'s error is raised as is.
        """
        try:
            while True:
                due = self._renewed_at + self.lease_ttl / 3 - time.monotonic()
                done, _ = await asyncio.wait({work}, timeout=max(due, 0.0))
                if done:
                    break
                if not await self._renew(lease):
                    raise LeaseLostError(lease.name, lease.owner, lease.fence)
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        work.result()

    async def _renew(self, lease: Lease) -> bool:
        """Renew ``lease`` (the heartbeat); False once it is lost, and then standing by.

        A store error is retried until the lease would expire (by this relay's clock, from
        its last renewal); the lease counts as lost from then on.
        """
        expires = self._renewed_at + self.lease_ttl
        while (left := expires - time.monotonic()) > 0:
            now = time.monotonic()
            try:
                async with asyncio.timeout(left):
                    renewed = await self._outbox.acquire_relay_lease(
                        self.name, self.owner, self.lease_ttl)
            except TimeoutError:
                break
            except _FATAL:
                raise
            except AgentEventsError as exc:
                log.warning("relay %r (%s) could not renew its lease (%s); it expires in "
                            "%.2f s", self.name, self.owner, exc, left)
                await asyncio.sleep(min(self.lease_ttl / 10, max(left, 0.0)))
                continue
            if renewed is not None and renewed.fence == lease.fence:
                self._lease, self._renewed_at = renewed, now
                return True
            log.warning("relay %r (%s) lost the outbox lease to another relay during a "
                        "batch; it stops publishing and stands by", self.name, self.owner)
            self._lease = None
            return False
        log.warning("relay %r (%s) could not renew the outbox lease before it expired; it "
                    "stops publishing and stands by", self.name, self.owner)
        self._lease = None
        return False

    async def _backoff(self, delay: float) -> None:
        """Sleep ``delay`` seconds before a retry, keeping the lease meanwhile if active."""
        lease = self._lease
        if lease is None:
            await asyncio.sleep(delay)
            return
        try:
            await self._renewing(lease, asyncio.ensure_future(asyncio.sleep(delay)))
        except LeaseLostError as exc:
            log.warning("%s", exc)

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until :meth:`stop`: the current batch is finished, then the lease released.

        Retries failures with backoff (see the module docstring); ends with the error only
        for configuration errors, a closed store or bus, and a stored event that cannot be
        read (:class:`~agentevents.core.errors.CorruptEventError`, after publishing the
        events before it).
        """
        self._stop_event = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        first_idle = min(FIRST_IDLE_WAIT, self.idle_timeout)
        idle = first_idle
        failures = 0
        standing_by = False
        try:
            while not self._stop_requested:
                try:
                    count = await self.run_once()
                except LeaseLostError as exc:
                    log.warning("%s", exc)
                    continue
                except CorruptEventError as exc:
                    log.error("relay %r (%s) stops: %s", self.name, self.owner, exc)
                    raise
                except _FATAL:
                    raise
                except AgentEventsError as exc:
                    failures += 1
                    delay = min(self.retry_backoff * 2 ** (failures - 1), self.max_backoff)
                    log.error("relay %r: %s; the batch stays in the outbox, retrying in %.2f s "
                              "(attempt %d)", self.name, exc, delay, failures)
                    await self._pause(self._backoff(delay))
                    continue
                failures = 0
                if count:
                    idle = first_idle
                    continue
                if self._lease is None:
                    if not standing_by:
                        log.info("relay %r (%s) stands by: another relay holds the lease",
                                 self.name, self.owner)
                    standing_by = True
                    # Jittered, so that standbys do not all ask at once.
                    await self._pause(asyncio.sleep(self.lease_ttl / 4 * random.uniform(0.8, 1.2)))
                    continue
                standing_by = False
                await self._pause(self._store.wait_for_append(self._idle_head, idle))
                idle = min(idle * 2, self.idle_timeout)
        finally:
            await self._release()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in progress (safe to call any time)."""
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def _pause(self, waiting: Awaitable[None]) -> None:
        """Wait for ``waiting``, or less if :meth:`stop` is called meanwhile."""
        assert self._stop_event is not None
        waiter = asyncio.ensure_future(waiting)
        stopper = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, stopper):
                task.cancel()
            # A failed wait (a closed store) shows again in the next step; not here.
            await asyncio.gather(waiter, stopper, return_exceptions=True)

    async def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            await self._outbox.release_relay_lease(lease)
        except AgentEventsError as exc:  # it expires by itself
            log.warning("relay %r could not release its lease (it expires in %.1f s): %s",
                        self.name, self.lease_ttl, exc)
        else:
            log.info("relay %r (%s) released the outbox lease", self.name, self.owner)


def _default_owner(name: str) -> str:
    """``name@host:pid:random``, unique per relay instance, at most 128 characters."""
    suffix = f"@{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return f"{name[: 128 - len(suffix)]}{suffix}"
