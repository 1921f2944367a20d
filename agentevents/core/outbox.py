"""The transactional outbox: what a store offers so that a relay can publish its events.

A plain "append, then publish" is a dual write: a crash between the two loses the
publication (or, the other way round, publishes an event that was never stored). With the
outbox turned on, a store records every appended event *for publication* in the same
transaction that appends it: both happen or neither does. A relay
(:class:`agentevents.relay.OutboxRelay`) then reads the recorded events in global order,
publishes them to a bus, and only once the bus has acknowledged them marks them published.

:class:`Outbox` is an optional ability of an :class:`~agentevents.core.store.EventStore`,
declared by implementing this small protocol (the built-in memory and SQL stores do).
The relay knows only this protocol, the store's :meth:`wait_for_append` and
:meth:`~agentevents.core.bus.Bus.publish_many`, so any store that implements it can be
relayed to any bus.

The contract
------------
* **Atomic recording.** When :attr:`Outbox.outbox_enabled` is true, every event that an
  ``append`` stores is recorded for publication by that very append (all or nothing), and
  an append that fails records nothing.
* **The outbox belongs to the storage**, not to a store object: once it is on (turned on
  by a store object opened with ``?outbox=true``, or by an explicit step of the storage,
  such as ``agentevents schema enable-outbox`` for SQL tables), appends through *every*
  store object of that storage are recorded, whatever their URL says, so no writer can
  bypass the relay. :attr:`Outbox.outbox_enabled` becomes true on a store object that
  finds it on.
* **Order.** :meth:`Outbox.read_outbox` returns the oldest recorded events that are not
  yet marked published, in global position order.
* **One active relay.** Relays share a named lease (:meth:`Outbox.acquire_relay_lease`):
  one holder at a time, until the lease expires unless renewed. Every takeover of the lease
  by a new owner increases its ``fence``. The active relay renews its lease while it
  publishes, so that a slow bus does not hand the lease (and the same batch) to another.
* **One name.** The outbox is one queue, so it is relayed under one name: once a lease of
  one name exists, asking for a lease of another name raises
  :class:`~agentevents.core.errors.RelayNameError` and changes nothing, whether that lease
  is held, expired or released. (Relays of two names would each remove what the others
  published, and each bus would get only part of the events.) To feed several buses, relay
  to one bus and bridge it to the others, or give each bus an outbox of its own (another
  store or table prefix); to rename the relay, stop its relays and delete the old lease
  (a SQL store's ``{prefix}relay_lease`` row).
* **Fencing.** :meth:`Outbox.mark_published` deletes only while the caller's lease is still
  the current one (same owner and fence); otherwise it raises
  :class:`~agentevents.core.errors.LeaseLostError` and changes nothing.
* **At least once.** An event leaves the outbox only through :meth:`mark_published`, which a
  relay calls after the bus acknowledged it. A relay that dies before that leaves the
  event in place, and the next active relay publishes it again: consumers may see an event
  twice (same event id; deduplicate on it), never zero times.

Lease times come from the relay's clock (``time.time()``), so relay machines' clocks must
agree to well within the lease time. The fence, not the clock, is what keeps a relay that
lost its lease from marking anything published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from agentevents.core.store import RecordedEvent

__all__ = ["Lease", "Outbox"]


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof that ``owner`` is the active relay ``name`` until ``expires_at``.

    ``fence`` grows by one every time a different owner takes the lease over; renewing
    keeps it. A :class:`Lease` whose fence is no longer the stored one is worthless.
    """

    name: str
    owner: str
    fence: int
    #: When the lease ends unless renewed (UTC, the acquiring relay's clock).
    expires_at: datetime


@runtime_checkable
class Outbox(Protocol):
    """A store that records appended events for publication (the transactional outbox).

    Every method raises :class:`~agentevents.core.errors.OutboxNotEnabledError` when
    :attr:`outbox_enabled` is false.
    """

    @property
    def outbox_enabled(self) -> bool:
        """Whether this store's appends record their events in the outbox."""
        ...

    async def acquire_relay_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take, or renew, the relay lease ``name`` for ``owner`` for ``ttl`` seconds.

        Succeeds when nobody holds the lease, when it expired, or when ``owner`` holds it
        (a renewal: same fence). A takeover from another owner increases the fence.
        Returns ``None`` while another owner's lease is still valid. Owners must be unique
        per relay instance (two processes must never share an owner name).

        Raises :class:`~agentevents.core.errors.RelayNameError` (changing nothing) when the
        outbox already has a lease of another name, held or not: one outbox, one relay
        name. Two relays of different names asking for a new outbox's first lease at once
        must not both get it: one name wins, the other is refused.
        """
        ...

    async def release_relay_lease(self, lease: Lease) -> None:
        """Give the lease up now (it expires at once), if ``lease`` is still the current one.

        So a standby relay takes over without waiting for the expiry. Does nothing when
        the lease has moved on.
        """
        ...

    async def read_outbox(self, limit: int) -> list[RecordedEvent]:
        """The oldest ``limit`` events recorded for publication and not yet marked
        published, in global position order."""
        ...

    async def mark_published(self, lease: Lease, positions: Sequence[int]) -> None:
        """Remove the events at ``positions`` from the outbox, if ``lease`` is current.

        Checks, in the same transaction as the delete, that ``lease`` (owner and fence) is
        still the stored lease; raises :class:`~agentevents.core.errors.LeaseLostError`
        and deletes nothing otherwise. Positions not in the outbox are ignored.
        """
        ...
