"""The Redis Streams transport (``redis://``, ``rediss://``); needs Redis >= 6.2.

URL::

    redis://[[user]:password@]host[:port][/db][?prefix=agentevents&maxlen=N
            &socket_timeout=5&max_payload_bytes=1048576&cluster=auto]
    rediss://...[?ssl_ca_certs=ca.pem&ssl_certfile=client.pem&ssl_keyfile=client.key
                 &ssl_cert_reqs=required]   (TLS)

* ``prefix`` (default ``agentevents``): every key this backend touches starts with
  ``<prefix>:`` (``{<prefix>}:`` on a cluster), so several applications (or test runs)
  share one server. No spaces, glob characters (``*?[]``) or braces.
* ``maxlen`` (default: unbounded): ``XADD ... MAXLEN ~ N`` on every event stream. Entries
  trimmed before a group read them are skipped by that group, as Redis does.
* ``socket_timeout`` (seconds, default 5): connect and command timeout.
* ``max_payload_bytes`` (default 1 MiB, at most 512 MiB, Redis' own bulk-string limit):
  the largest encoded event ``publish`` accepts (:class:`PayloadTooLargeError` above it).
  Big payloads belong in object storage; raise it if your events really are larger.
* ``cluster`` (``auto``, the default; ``true``; ``false``): whether the server is a Redis
  Cluster, see *Redis Cluster* below. ``auto`` asks the server once (``INFO cluster``)
  before the first command.
* TLS (``rediss://`` only; the names redis-py's own URLs use): ``ssl_ca_certs``, a PEM file
  of the CAs to trust (default: the system's); ``ssl_certfile`` and ``ssl_keyfile``, a
  client certificate and its key, for servers that require one (``redis-server``'s
  ``tls-auth-clients yes``, its default); ``ssl_cert_reqs`` (``required``, the default;
  ``none`` turns verification off: tests only).

Key layout (plain Redis types, readable by any client; nothing is pickled; on a cluster
every ``<prefix>`` below is ``{<prefix>}``, see *Redis Cluster*):

``<prefix>:stream:<event type>``
    One stream per event type. Each entry has flat fields: ``id`` (event id), ``type``,
    ``key`` (only if set), ``source`` and ``time`` (ISO 8601; absent for raw messages),
    ``pt`` (publish time: the publishing transport's clock in microseconds when it sent
    the entry, strictly increasing per transport; see *Receiving*) and ``body``, the
    structured-mode CloudEvents JSON document that consumers decode. Entries written by
    other clients need only ``body`` (``type`` defaults to the stream's event type).
``<prefix>:types``
    A SET of every event type ever published (the streams that exist). A publisher adds a
    type (in the same pipeline, before the ``XADD``) the first time it publishes it.
    Receivers re-read it (``SCARD`` every 0.25 s, ``SMEMBERS`` when it grew) to discover
    streams created after they started, so ``code.>`` receives ``code.build.failed``
    first published later. The first event of a brand-new type may therefore wait up to
    one blocking read (<= 1 s) before a wildcard subscriber sees it.
``<prefix>:groups``
    A HASH: consumer-group name -> the stream id the group starts from on streams it
    discovers later (``0-0`` for ``start="earliest"``; for ``"latest"`` the server time
    at which the group was created). Written once (``HSETNX``): ``start`` applies only to
    a new group.
``<prefix>:deadletter``
    The dead-letter stream: one entry per :class:`DeadLetter`, one flat field per model
    field (``id``, ``time``, ``group``, ``pattern``, ``topic``, ``event_id``,
    ``event_type``, ``error``, ``error_type``, ``attempts``, ``body``, ``body_base64``;
    ``None`` fields are omitted; ``body`` is the original message text, base64 when
    ``body_base64`` is ``true``).

Groups: an agentevents group is ``(group, pattern)``; its Redis consumer-group name is the
sanitised group name, ``_``, and a hash of both (``orders_a1b2c3d4e5f6``). The consumer
group is created on every matching stream (``XGROUP CREATE ... MKSTREAM``): at ``$``
(latest) or ``0`` (earliest) on the streams that exist when the group is first created,
and at the group's recorded start id on streams discovered later, so nothing published to
a new stream after the group began is missed. Each member is a Redis consumer named
``ConsumerSpec.consumer``.

Receiving (one member): ``XREADGROUP ... BLOCK <= 1 s COUNT n STREAMS <all matching> >``.
Entries of several streams are merged in publish order as far as Redis can tell: by the
entry's millisecond (the server's clock, one for all streams), then ``pt``, then the
entry's sequence number. ``pt`` is given in the order entries go into a publish pipeline
and never repeats or decreases within one transport (``max(last + 1, now in µs)``), so a
lone member is meant to see one publisher's events in its publish order even when a key's
events have different types and their event ids are not in publish order (ids minted long
before publishing, as by an outbox relay: the event id plays no part). Known gap: under
load a key's later event of one type has still been seen to overtake an earlier one of
another type (the outbox fault test with two types, about one run in four); keep one type
per key where cross-type order matters until that is found.
Entries of different publishers within one Redis millisecond are ordered by their clocks,
which is the best Redis can tell about events that were published concurrently. Entries
without a numeric ``pt`` (written by other clients) order as ``pt = 0``: first within
their millisecond. Redis applies ``COUNT`` per stream, so a stream that returned a full
``COUNT`` may hold older entries than another stream returned: entries beyond the earliest
such "horizon" wait in a local buffer (they are already in this member's pending list)
until the next read of the full streams has caught up; buffered entries that waited longer
than ``ack_timeout / 4`` get their idle clock reset (``XCLAIM ... JUSTID``, unless another
member claimed them meanwhile) before they are handed out. Every
``min(ack_timeout / 4, 2 s)`` the member runs ``XAUTOCLAIM`` with ``min-idle-time =
ack_timeout`` on each stream: entries of a vanished member come here, with their delivery
count read from the pending list (``XPENDING``), so the core counts the earlier deliveries.
A stream or group that disappeared (``NOGROUP``: deleted, or the server restarted without
persistence) is re-created and the type registry re-read. A closing member hands its
buffered entries back and deletes its Redis consumer from the streams where it holds
nothing pending (``XGROUP DELCONSUMER``), so members do not pile up.

* ack: one multi-id ``XACK`` per stream per batch, pipelined.
* extend: ``XCLAIM <self> 0 <ids> JUSTID`` (resets the idle time).
* nack(delay): the entry stays pending; ``XCLAIM <self> 0 <ids> IDLE <ms> JUSTID`` sets its
  idle time to ``ack_timeout - delay`` (to years when ``delay`` is 0), so the next
  ``XAUTOCLAIM`` of any member takes it after ``delay`` seconds. Nothing is kept locally,
  so a handed-back entry survives this process: closing a member hands its unstarted
  entries to the others at once.

Ephemeral subscribers (``group=None``) use ``XREAD`` from remembered last ids (the last
entry of each stream when they subscribed; server time for streams discovered later);
ack and extend do nothing, nack re-queues locally.

Publishing: ``XADD`` (``*`` ids) in a non-transactional pipeline; the reply is Redis'
acceptance (durability beyond that is the server's ``appendonly``/``appendfsync``
setting). Concurrent ``publish`` calls are coalesced: while one pipeline is in flight the
next calls collect, and go together in the next one; an idle publisher sends at once.

Redis Cluster: the URL names any one node (``redis://node1:6379``); with ``cluster=auto``
the transport sees ``cluster_enabled:1`` and switches to redis-py's ``RedisCluster``, which
finds the other nodes and follows ``MOVED``/``ASK`` redirects. Only ``db`` 0 exists there.
Every key of one namespace carries the hash tag ``{<prefix>}``::

    {agentevents}:stream:<event type>   {agentevents}:types
    {agentevents}:groups                {agentevents}:deadletter

so they all hash to one slot, on one node (and its replicas), and everything above works
unchanged: a wildcard member reads all its streams with one ``XREADGROUP``, a publish
pipeline (``SADD`` + ``XADD``) and every settle pipeline go to one node, and entries of
all streams get their ids from one clock, so the cross-stream ordering holds. The price:
one namespace is as fast as one node, and the cluster spreads *namespaces* (prefixes), not
event types, over its nodes. The alternative, a tag per event type, would spread a
namespace's streams over the nodes, but a wildcard member could no longer read its streams
with one command (a multi-key ``XREADGROUP`` must stay in one slot): it would need one
blocking read per slot, so a connection per slot per member, publish pipelines split per
node, and a merge of entries stamped by different clocks. A single Redis node appends
hundreds of thousands of stream entries a second, more than an agent bus needs; a cluster
is there for failover (replicas) and for sharing one deployment between many namespaces.
Reads (``XREADGROUP``, ``XREAD``, ``TIME``) are sent straight to the node that owns the
namespace's slot: redis-py would otherwise ask the server for the keys of every
``XREADGROUP`` (``COMMAND GETKEYS``), a second round trip per read. The single-node layout
has no braces (``agentevents:stream:...``); moving a namespace between a single server and
a cluster means renaming its keys.

Capabilities: ``ordered_per_key`` is false: the members of a group share each stream, so
two members may hold events of one key at once (a lone member keeps publish order, see
above; the core runs each key one at a time inside a member). No broker-side dedupe
(``XADD`` has none before Redis 8.2's ``IDMP``); durable groups, replay (what ``maxlen``
retains) and cross-process members are true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import (
    AgentEventsError,
    BackendConnectionError,
    BusError,
    ConfigurationError,
    PublishError,
    SubscribeError,
)
from agentevents.core.transport import (
    Capabilities,
    ConsumerSpec,
    InboundMessage,
    OutboundMessage,
    Receiver,
    Transport,
    durable_name,
)
from agentevents.core.urls import redact_url

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from agentevents.core.patterns import Pattern

__all__ = ["RedisBusConfig", "RedisReceiver", "RedisTransport"]

#: Default ``max_payload_bytes``: 1 MiB (configurable up to Redis' 512 MiB bulk limit).
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
REDIS_MAX_BULK_BYTES = 512 * 1024 * 1024
#: Longest single blocking read; bounds how late a newly created stream is noticed.
BLOCK_CAP = 1.0
#: How often a receiver checks the type registry for new streams.
DISCOVERY_INTERVAL = 0.25
#: Poll interval while a receiver has no matching stream at all.
NO_STREAM_POLL = 0.1
_MAX_SEQ = 18446744073709551615
#: Idle time given to an entry handed back with no delay: any member's XAUTOCLAIM takes it.
_HANDED_BACK_IDLE_MS = 10**12
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_KNOWN_OPTIONS = ("prefix", "maxlen", "socket_timeout", "max_payload_bytes", "cluster",
                  *_TLS_OPTIONS)
_SWITCHES = {"auto": None, "true": True, "yes": True, "1": True, "false": False, "no": False,
             "0": False}
_CERT_REQS = ("required", "optional", "none")
#: Connections per cluster node; every member blocked in a read holds one (a single-node
#: client's pool has no limit either).
_CLUSTER_MAX_CONNECTIONS = 1 << 16
#: ``RedisClusterException`` (no slot covered, cluster mode off, ...) is no ``RedisError``.
_CLIENT_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)


@dataclass(frozen=True, slots=True)
class RedisBusConfig:
    """Settings of a :class:`RedisTransport`, parsed from its URL (see the module doc)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    prefix: str = "agentevents"
    maxlen: int | None = None
    socket_timeout: float = 5.0
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    #: Redis Cluster (hash-tagged keys, cluster client); ``None``: ask the server.
    cluster: bool | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    #: The URL with its password replaced by ``***``: for messages and reprs.
    display_url: str = "redis://127.0.0.1:6379/0"

    @classmethod
    def from_url(cls, url: str) -> RedisBusConfig:
        """Parse ``redis://`` / ``rediss://`` URLs; bad values raise ConfigurationError."""
        shown = redact_url(url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"not a Redis URL: {shown!r} (use redis:// or rediss://)")
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        unknown = set(query) - set(_KNOWN_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(_KNOWN_OPTIONS)}"
            )
        try:
            port = parts.port or 6379
            path = parts.path.strip("/")
            db = int(path) if path else 0
            maxlen = int(query["maxlen"]) if "maxlen" in query else None
            timeout = float(query.get("socket_timeout", "5"))
            limit = int(query.get("max_payload_bytes", str(DEFAULT_MAX_PAYLOAD_BYTES)))
        except ValueError as exc:
            raise ConfigurationError(f"Redis bus URL {shown!r}: {exc}") from exc
        prefix = query.get("prefix", "agentevents")
        if not prefix or re.search(r"[\s*?\[\]{}]", prefix):
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: prefix must be non-empty, without spaces, "
                "glob characters (*?[]) or braces ({} make the cluster hash tag)"
            )
        switch = query.get("cluster", "auto").lower()
        if switch not in _SWITCHES:
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: cluster must be auto, true or false, "
                f"not {query['cluster']!r}"
            )
        cluster = _SWITCHES[switch]
        if cluster and db != 0:
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: a Redis Cluster has only db 0"
            )
        tls_options = {name: query[name] for name in _TLS_OPTIONS if name in query}
        if tls_options and scheme != "rediss":
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: {', '.join(sorted(tls_options))} need(s) "
                "rediss:// (TLS)"
            )
        cert_reqs = tls_options.get("ssl_cert_reqs", "required").lower()
        if cert_reqs not in _CERT_REQS:
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: ssl_cert_reqs must be one of "
                f"{', '.join(_CERT_REQS)}"
            )
        if "ssl_keyfile" in tls_options and "ssl_certfile" not in tls_options:
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: ssl_keyfile needs ssl_certfile"
            )
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if name in tls_options and not os.path.isfile(tls_options[name]):
                raise ConfigurationError(  # the key file's path is not shown: redacted
                    f"Redis bus URL {shown!r}: {name} names no readable file"
                    + ("" if name == "ssl_keyfile" else f" ({tls_options[name]!r})")
                )
        if maxlen is not None and maxlen < 1:
            raise ConfigurationError(f"Redis bus URL {shown!r}: maxlen must be at least 1")
        if timeout <= 0:
            raise ConfigurationError(f"Redis bus URL {shown!r}: socket_timeout must be > 0")
        if not 1 <= limit <= REDIS_MAX_BULK_BYTES:
            raise ConfigurationError(
                f"Redis bus URL {shown!r}: max_payload_bytes must be between 1 and "
                f"{REDIS_MAX_BULK_BYTES} (Redis' bulk-string limit)"
            )
        if db < 0:
            raise ConfigurationError(f"Redis bus URL {shown!r}: db must not be negative")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=scheme == "rediss",
            prefix=prefix,
            maxlen=maxlen,
            socket_timeout=timeout,
            max_payload_bytes=limit,
            cluster=cluster,
            ssl_ca_certs=tls_options.get("ssl_ca_certs"),
            ssl_certfile=tls_options.get("ssl_certfile"),
            ssl_keyfile=tls_options.get("ssl_keyfile"),
            ssl_cert_reqs=cert_reqs,
            display_url=shown,
        )

    # -- key names ----------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """What every key starts with: ``<prefix>``, or ``{<prefix>}`` (one hash slot) on
        a cluster."""
        return f"{{{self.prefix}}}" if self.cluster else self.prefix

    def stream_key(self, topic: str) -> str:
        """The stream of one event type."""
        return f"{self.namespace}:stream:{topic}"

    @property
    def types_key(self) -> str:
        """The SET of every published event type."""
        return f"{self.namespace}:types"

    @property
    def groups_key(self) -> str:
        """The HASH of consumer groups and their start id on later streams."""
        return f"{self.namespace}:groups"

    @property
    def deadletter_key(self) -> str:
        """The dead-letter stream."""
        return f"{self.namespace}:deadletter"

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments that ``Redis`` and ``RedisCluster`` both take."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout + BLOCK_CAP,
            "socket_connect_timeout": self.socket_timeout,
            "decode_responses": False,
        }
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=self.ssl_ca_certs,
                           ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                           ssl_cert_reqs=self.ssl_cert_reqs)
        return options


def group_name(group: str, pattern: str) -> str:
    """The Redis consumer-group name of agentevents group ``(group, pattern)``."""
    return durable_name(group, pattern, length=48, unsafe=r"[^A-Za-z0-9_.-]")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: ``(Redis millisecond, pt, entry sequence)``, see :func:`_order`.
Order = tuple[int, int, int]


def _order(entry_id: bytes, fields: dict[bytes, bytes] | None) -> Order:
    """Sort key of an entry, publish order across streams as far as Redis can tell: the
    entry's millisecond, then ``pt`` (the publisher's publish time in microseconds,
    strictly increasing per transport; 0 when absent or not a number, as in entries
    written by other clients), then the entry's sequence number."""
    ms, _, seq = entry_id.partition(b"-")
    stamp = (fields or {}).get(b"pt", b"")
    return int(ms), int(stamp) if stamp.isdigit() else 0, int(seq or b"0")


def _after(server_ms: int) -> str:
    """A stream id just below every id Redis assigns from ``server_ms`` on."""
    return f"{server_ms - 1}-{_MAX_SEQ}" if server_ms > 0 else "0-0"


@dataclass(slots=True, eq=False)
class _Handle:
    stream: str
    entry_id: bytes
    order: Order
    #: When this member read it (monotonic): buffered entries age.
    read_at: float = field(default_factory=time.monotonic)


def _message(stream: str, entry_id: bytes, fields: dict[bytes, bytes] | None,
             count: int) -> InboundMessage | None:
    if fields is None:  # deleted (trimmed) while pending
        return None
    topic = fields.get(b"type")
    return InboundMessage(
        body=fields.get(b"body", b""),
        topic=topic.decode("utf-8", "replace") if topic else stream.rsplit(":", 1)[-1],
        delivery_count=count,
        handle=_Handle(stream, entry_id, _order(entry_id, fields)),
    )


def _by_stream(messages: Iterable[InboundMessage]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for message in messages:
        handle: _Handle = message.handle
        out.setdefault(handle.stream, []).append(handle.entry_id)
    return out


class RedisTransport(Transport):
    """Redis Streams transport; see the module docstring for the key layout."""

    def __init__(self, config: RedisBusConfig | None = None) -> None:
        self.config = config = config or RedisBusConfig()
        #: The client: a ``RedisCluster`` once the server is known to be a cluster.
        self.client: aioredis.Redis | RedisCluster
        if config.cluster:
            self.client = self._cluster_client()
        else:
            self.client = aioredis.Redis(db=config.db, **config.client_options())
        #: Whether the mode is settled and a cluster client has its slot map.
        self._ready = config.cluster is False
        self._ready_lock = asyncio.Lock()
        self.capabilities = Capabilities(
            ordered_per_key=False,
            durable_groups=True,
            replay=True,
            broker_dedupe=False,
            cross_process=True,
            max_payload_bytes=config.max_payload_bytes,
        )
        self._known_types: set[str] = set()
        #: The last ``pt`` given to an entry (see :meth:`_stamp`).
        self._last_pt = 0
        self._queue: list[tuple[Sequence[OutboundMessage], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sending = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> RedisTransport:
        """Build a transport from ``redis://...`` (see the module docstring)."""
        return cls(RedisBusConfig.from_url(url))

    def _cluster_client(self) -> RedisCluster:
        return RedisCluster(max_connections=_CLUSTER_MAX_CONNECTIONS,
                            **self.config.client_options())

    async def connect(self) -> None:
        """Settle ``cluster=auto`` (one ``INFO cluster``) and, on a cluster, load its slot
        map. Every entry point calls it; it only talks to the server the first time."""
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            config, client = self.config, self.client
            if isinstance(client, RedisCluster):  # cluster=true
                await client.initialize()
                self._ready = True
                return
            try:
                info = await client.info("cluster")
            except redis_errors.ResponseError:  # INFO refused (ACL, renamed): not a cluster
                info = {}
            if info.get("cluster_enabled"):  # (a db other than 0 failed above: SELECT)
                self.config = replace(config, cluster=True)
                cluster = self._cluster_client()
                try:
                    await cluster.initialize()
                except BaseException:
                    self.config = config
                    await cluster.aclose()
                    raise
                self.client = cluster
                await client.aclose()
            else:
                self.config = replace(config, cluster=False)
            self._ready = True

    async def namespace_command(self, *args: Any) -> Any:
        """Run a command whose keys are all this namespace's, on the node owning them.

        On a cluster every key of the namespace is in one slot: the command goes straight
        to that slot's node (redis-py would ask the server for the keys of commands such as
        ``XREADGROUP`` first); a ``MOVED`` reply is still followed.
        """
        client: Any = self.client  # redis-py leaves Redis.execute_command untyped
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(self.config.types_key)
            return await client.execute_command(*args, target_nodes=node)
        return await client.execute_command(*args)

    def __repr__(self) -> str:
        return f"<RedisTransport {self.config.display_url}>"

    def _stamp(self) -> int:
        """The next entry's ``pt``: now in microseconds, strictly above the last one.

        Called in the order entries go into pipelines, and pipelines go out one at a time,
        so ``pt`` grows in the order Redis appends this transport's entries.
        """
        stamp = self._last_pt = max(self._last_pt + 1, time.time_ns() // 1000)
        return stamp

    def error(self, what: str, exc: BaseException) -> str:
        """A message for a client error, naming the (redacted) server."""
        detail = str(exc) or type(exc).__name__
        return f"{what} on Redis at {self.config.display_url} failed: {detail}"

    # -- publishing ---------------------------------------------------------------------

    async def send(self, messages: Sequence[OutboundMessage]) -> None:
        if not messages:
            return
        if not self._ready:
            try:
                await self.connect()
            except _CLIENT_ERRORS as exc:
                raise PublishError(
                    self.error(f"publishing {len(messages)} event(s)", exc)
                    + "; nothing is lost by publishing again (event ids are idempotency keys)"
                ) from exc
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((messages, future))
        if not self._sending:
            # Idle: send at once, from this task. Calls arriving meanwhile queue up and
            # go together in the next pipeline, sent by a background flusher.
            self._sending = True
            try:
                batch, self._queue = self._queue, []
                await self._flush(batch)
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: the caller sees the cancellation
                raise
            finally:
                if self._queue:
                    self._flusher = asyncio.create_task(self._flush_loop(),
                                                        name="agentevents-redis-send")
                else:
                    self._sending = False
        await future

    async def _flush_loop(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._flush(batch)
        finally:
            self._flusher = None
            self._sending = False

    async def _flush(
        self, batch: list[tuple[Sequence[OutboundMessage], asyncio.Future[None]]]
    ) -> None:
        config = self.config
        if len(batch) == 1 and len(batch[0][0]) == 1 and batch[0][0][0].topic in self._known_types:
            await self._send_one(batch[0][0][0], batch[0][1])
            return
        pipe = self.client.pipeline(transaction=False)
        owners: list[int] = []
        adding: dict[str, int] = {}
        for index, (messages, future) in enumerate(batch):
            if future.done():  # the caller was cancelled before we got to it
                continue
            for message in messages:
                topic = message.topic
                if topic not in self._known_types and topic not in adding:
                    adding[topic] = len(owners)
                    pipe.sadd(config.types_key, topic)
                    owners.append(index)
                pipe.xadd(config.stream_key(topic), _fields(message, self._stamp()),
                          maxlen=config.maxlen, approximate=True)
                owners.append(index)
        if not owners:
            return
        failed: dict[int, BaseException] = {}
        try:
            results = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _messages, future in batch:
                if not future.done():
                    future.set_exception(PublishError("publishing was cancelled"))
            raise
        except _CLIENT_ERRORS as exc:
            results = [exc] * len(owners)
            # The server may come back empty (restarted without persistence): register
            # every type again from now on.
            self._known_types.clear()
        for owner, result in zip(owners, results, strict=True):
            if isinstance(result, BaseException):
                failed.setdefault(owner, result)
        for topic, position in adding.items():
            if not isinstance(results[position], BaseException):
                self._known_types.add(topic)
        for index, (messages, future) in enumerate(batch):
            if future.done():
                continue
            cause = failed.get(index)
            if cause is None:
                future.set_result(None)
            else:
                error = PublishError(
                    self.error(f"publishing {len(messages)} event(s)", cause)
                    + "; nothing is lost by publishing again (event ids are idempotency keys)"
                )
                error.__cause__ = cause
                future.set_exception(error)

    async def _send_one(self, message: OutboundMessage, future: asyncio.Future[None]) -> None:
        """The common idle case: one event of a known type, one plain ``XADD``."""
        config = self.config
        try:
            await self.client.xadd(config.stream_key(message.topic),
                                   _fields(message, self._stamp()),
                                   maxlen=config.maxlen, approximate=True)
        except _CLIENT_ERRORS as exc:
            if not isinstance(exc, redis_errors.ResponseError):
                self._known_types.clear()
            if not future.done():
                error = PublishError(
                    self.error("publishing 1 event", exc)
                    + "; nothing is lost by publishing again (event ids are idempotency keys)"
                )
                error.__cause__ = exc
                future.set_exception(error)
            return
        if not future.done():
            future.set_result(None)

    # -- receiving ----------------------------------------------------------------------

    async def open_receiver(self, spec: ConsumerSpec) -> Receiver:
        if self._closed:
            raise SubscribeError(f"{self!r} is closed")
        try:
            await self.connect()  # before the receiver copies the client and key names
        except _CLIENT_ERRORS as exc:
            raise SubscribeError(
                self.error(f"subscribing to {spec.pattern.text!r}", exc)
            ) from exc
        receiver: _StreamReceiver
        if spec.group is None:
            receiver = RedisEphemeralReceiver(self, spec)
        else:
            receiver = RedisReceiver(self, spec)
        try:
            await receiver.start()
        except _CLIENT_ERRORS as exc:
            raise SubscribeError(
                self.error(f"subscribing to {spec.pattern.text!r}", exc)
            ) from exc
        return receiver

    async def server_ms(self) -> int:
        """The clock of the Redis server holding the streams, in milliseconds (stream ids
        use it)."""
        seconds, micros = await self.namespace_command("TIME")
        return int(seconds) * 1000 + int(micros) // 1000

    # -- dead letters -------------------------------------------------------------------

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        try:
            await self.connect()
        except _CLIENT_ERRORS as exc:
            raise BusError(self.error("writing dead letters", exc)) from exc
        pipe = self.client.pipeline(transaction=False)
        for letter in letters:
            fields: dict[str, str] = {}
            for name, value in letter.model_dump(mode="json").items():
                if value is None:
                    continue
                fields[name] = value if isinstance(value, str) else json.dumps(value)
            pipe.xadd(self.config.deadletter_key, fields)  # type: ignore[arg-type]
        try:
            await pipe.execute()
        except _CLIENT_ERRORS as exc:
            raise BusError(self.error("writing dead letters", exc)) from exc

    async def read_dead_letters(
        self, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        start = "-"
        try:
            await self.connect()
            while len(out) < limit:
                page = await self.client.xrange(self.config.deadletter_key, start, "+",
                                                count=500)
                if not page:
                    break
                for _entry_id, raw in page:
                    data: dict[str, Any] = {_text(k): _text(v) for k, v in (raw or {}).items()}
                    if (group is not None and data.get("group") != group):
                        continue
                    data.setdefault("group", None)
                    out.append(DeadLetter.model_validate(data))
                    if len(out) >= limit:
                        break
                start = "(" + _text(page[-1][0])
        except _CLIENT_ERRORS as exc:
            raise BackendConnectionError(self.error("reading dead letters", exc)) from exc
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        flusher = self._flusher
        if flusher is not None:
            with contextlib.suppress(Exception):
                await flusher
        await self.client.aclose()


def _read_options(count: int, block: float | None) -> list[Any]:
    """``COUNT n [BLOCK ms]`` of an ``XREAD`` / ``XREADGROUP``."""
    options: list[Any] = ["COUNT", count]
    if block is not None:
        options += ["BLOCK", max(1, int(block * 1000))]
    return options


def _fields(message: OutboundMessage, stamp: int) -> dict[Any, Any]:
    """An event stream entry's flat fields (see the module doc); ``stamp`` is its ``pt``."""
    fields: dict[Any, Any] = {"id": message.id, "type": message.topic}
    if message.key is not None:
        fields["key"] = message.key
    event = message.event
    if event is not None:
        fields["source"] = event.source
        fields["time"] = event.time.isoformat()
    fields["pt"] = stamp
    fields["body"] = message.body
    return fields


class _StreamReceiver(Receiver):
    """What group members and ephemeral subscribers share: stream discovery, buffering."""

    def __init__(self, transport: RedisTransport, spec: ConsumerSpec) -> None:
        self._transport = transport
        self._config = transport.config
        self._client: Any = transport.client  # redis-py stubs type replies as unions
        self._spec = spec
        self._pattern: Pattern = spec.pattern
        self._streams: dict[str, Any] = {}  # stream key -> read position / marker
        self._types_seen = -1
        self._next_discovery = 0.0
        #: Entries read (so already pending for this member) but not handed out yet,
        #: sorted by :func:`_order`.
        self._buffer: list[InboundMessage] = []
        #: Buffered entries up to this order are complete (see :meth:`_collect`).
        self._horizon: Order | None = None
        #: Streams that returned a full COUNT in the last read (they bound the horizon).
        self._full: list[str] = []
        self._closed = False
        self._block_cap = min(BLOCK_CAP, self._config.socket_timeout / 2)

    async def start(self) -> None:
        """Create or join the consumer; every matching stream is known when this returns."""
        raise NotImplementedError  # pragma: no cover - overridden

    async def _matching_types(self) -> list[str]:
        members = await self._client.smembers(self._config.types_key)
        self._types_seen = len(members)
        self._next_discovery = time.monotonic() + DISCOVERY_INTERVAL
        return sorted(t for t in (_text(m) for m in members) if self._pattern.matches(t))

    async def _discover(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_discovery:
            return
        self._next_discovery = now + DISCOVERY_INTERVAL
        count = await self._client.scard(self._config.types_key)
        if count == self._types_seen:
            return
        keys = [self._config.stream_key(t) for t in await self._matching_types()]
        new = [key for key in keys if key not in self._streams]
        if new:
            await self._add_streams(new)

    async def _add_streams(self, keys: list[str]) -> None:
        raise NotImplementedError  # pragma: no cover - overridden

    async def _due(self, limit: int) -> list[InboundMessage]:
        """Redeliveries due now (claimed or handed back)."""
        return []

    def _claim_wait(self) -> float:
        """Seconds until :meth:`_due` may have something."""
        return BLOCK_CAP

    async def _read(
        self, limit: int, block: float | None, only: list[str] | None = None
    ) -> tuple[list[InboundMessage], Order | None]:
        """Read new entries (of ``only`` these streams, default all); see :meth:`_collect`."""
        raise NotImplementedError  # pragma: no cover - overridden

    async def _refresh(self, messages: list[InboundMessage]) -> list[InboundMessage]:
        """Buffered messages about to be handed out late: keep them ours (groups)."""
        return messages

    def _collect(self, result: Any, count: int, delivery: int,
                 seen: Any = None) -> tuple[list[InboundMessage], Order | None]:
        """Messages of an XREAD(GROUP) reply, and the horizon up to which they are complete.

        Redis applies COUNT per stream: a stream that returned ``count`` entries may hold
        more, older than what other streams returned. Entries beyond the earliest such
        last entry (the horizon) wait in the buffer until the next read has caught up.
        """
        out: list[InboundMessage] = []
        horizon: Order | None = None
        replies = list(result or ())
        self._full = []
        for stream, entries in replies:
            key = _text(stream)
            for entry_id, fields in entries:
                if seen is not None:
                    seen(key, entry_id)
                message = _message(key, entry_id, fields, delivery)
                if message is not None:
                    out.append(message)
            if len(entries) >= count and entries and len(self._streams) > 1:
                self._full.append(key)
                last = _order(entries[-1][0], entries[-1][1])
                horizon = last if horizon is None else min(horizon, last)
        return out, horizon

    async def _release(self, new: list[InboundMessage], limit: int,
                       horizon: Order | None) -> list[InboundMessage]:
        """Merge ``new`` into the buffer; hand out, in order, what is safe (<= horizon)."""
        old = self._buffer
        self._horizon = horizon
        if not old and len(new) <= limit and horizon is None:
            return sorted(new, key=lambda m: m.handle.order) if len(new) > 1 else new
        pool = sorted([*old, *new], key=lambda m: m.handle.order)
        ready = len(pool) if horizon is None else sum(
            1 for m in pool if m.handle.order <= horizon)
        take = min(limit, max(ready, 1))
        out, self._buffer = pool[:take], pool[take:]
        cutoff = time.monotonic() - self._spec.ack_timeout / 4
        stale = [m for m in out if m.handle.read_at < cutoff]
        if stale:
            keep = {id(m) for m in await self._refresh(stale)}
            out = [m for m in out if m.handle.read_at >= cutoff or id(m) in keep]
        return out

    async def receive(self, max_messages: int, timeout: float) -> Sequence[InboundMessage]:
        if self._closed:
            return []
        limit = max(1, max_messages)
        try:
            if self._buffer:
                horizon = self._horizon
                if horizon is None or self._buffer[0].handle.order <= horizon:
                    out = await self._release([], limit, horizon)  # complete: hand out
                else:  # read on (without waiting) and merge before handing out
                    got, horizon = await self._read(limit, None, self._full or None)
                    out = await self._release(got, limit, horizon)
                if out:
                    return out
        except _CLIENT_ERRORS as exc:
            raise BackendConnectionError(
                self._transport.error(f"receiving {self._pattern.text!r}", exc)
            ) from exc
        deadline = time.monotonic() + timeout
        try:
            while not self._closed:
                await self._discover()
                due = await self._due(limit)
                if due:
                    return await self._release(due, limit, None)
                remaining = deadline - time.monotonic()
                if not self._streams:
                    if remaining <= 0:
                        return []
                    await asyncio.sleep(min(remaining, NO_STREAM_POLL))
                    self._next_discovery = 0.0
                    continue
                wait = min(remaining, self._block_cap, self._claim_wait())
                got, horizon = await self._read(limit, wait if wait > 0.001 else None)
                if got:
                    return await self._release(got, limit, horizon)
                if remaining <= 0:
                    return []
        except _CLIENT_ERRORS as exc:
            raise BackendConnectionError(
                self._transport.error(f"receiving {self._pattern.text!r}", exc)
            ) from exc
        return []


class RedisReceiver(_StreamReceiver):
    """One member of a durable group: a Redis consumer in the group's consumer groups."""

    def __init__(self, transport: RedisTransport, spec: ConsumerSpec) -> None:
        super().__init__(transport, spec)
        assert spec.group is not None
        self.group = group_name(spec.group, spec.pattern.text)
        self._consumer = spec.consumer
        self._late_start = "0-0"
        self._ack_ms = max(1, int(spec.ack_timeout * 1000))
        self._claim_period = max(0.05, min(spec.ack_timeout / 4, 2.0))
        self._next_claim = 0.0

    async def start(self) -> None:
        client, config = self._client, self._config
        if self._spec.start == "earliest":
            proposed = "0-0"
        else:
            proposed = _after(await self._transport.server_ms())
        created = await client.hsetnx(config.groups_key, self.group, proposed)
        recorded = await client.hget(config.groups_key, self.group)
        self._late_start = _text(recorded) if recorded is not None else proposed
        keys = [config.stream_key(t) for t in await self._matching_types()]
        if created:  # a new group: streams that exist now start at $ or 0
            await self._create_groups(keys, "0" if self._spec.start == "earliest" else "$")
        else:
            await self._create_groups(keys, self._late_start)

    async def _create_groups(self, keys: list[str], start: str) -> None:
        if not keys:
            return
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.xgroup_create(key, self.group, id=start, mkstream=True)
        results = await pipe.execute(raise_on_error=False)
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, BaseException) and "BUSYGROUP" not in str(result):
                raise result
            self._streams[key] = ">"

    async def _add_streams(self, keys: list[str]) -> None:
        await self._create_groups(keys, self._late_start)
        self._next_claim = 0.0  # a joined group may hold entries of vanished members

    def _claim_wait(self) -> float:
        return max(0.0, self._next_claim - time.monotonic())

    async def _due(self, limit: int) -> list[InboundMessage]:
        now = time.monotonic()
        if now < self._next_claim or not self._streams:
            return []
        self._next_claim = now + self._claim_period
        keys = list(self._streams)
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.xautoclaim(key, self.group, self._consumer, self._ack_ms, "0-0", count=limit)
        results = await pipe.execute(raise_on_error=False)
        claimed: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        mine = {(m.handle.stream, m.handle.entry_id) for m in self._buffer}
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, BaseException):
                if "NOGROUP" in str(result):  # the stream or group was deleted: re-create
                    await self._create_groups([key], self._late_start)
                    self._types_seen = -1  # and re-read the registry (server restarted?)
                    self._next_discovery = 0.0
                    continue
                raise result
            for entry in result[1]:
                if entry and entry[1] is not None and (key, entry[0]) not in mine:
                    claimed.append((key, entry[0], entry[1]))
        if not claimed:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key, entry_id, _ in claimed:
            pipe.xpending_range(key, self.group, entry_id, entry_id, 1, self._consumer)
        counts = await pipe.execute(raise_on_error=False)
        out: list[InboundMessage] = []
        for (key, entry_id, fields), pending in zip(claimed, counts, strict=True):
            count = 2
            if not isinstance(pending, BaseException) and pending:
                count = max(2, int(pending[0]["times_delivered"]))
            message = _message(key, entry_id, fields, count)
            if message is not None:
                out.append(message)
        out.sort(key=lambda m: m.handle.order)
        return out

    async def _read(
        self, limit: int, block: float | None, only: list[str] | None = None
    ) -> tuple[list[InboundMessage], Order | None]:
        keys = list(only or self._streams)
        try:
            result = await self._transport.namespace_command(
                "XREADGROUP", "GROUP", self.group, self._consumer, *_read_options(limit, block),
                "STREAMS", *keys, *([">"] * len(keys)),
            )
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # A stream or the group was deleted (or the server restarted empty): create
            # them again where the group starts, and re-read the type registry.
            await self._create_groups(list(self._streams), self._late_start)
            self._types_seen = -1
            self._next_discovery = 0.0
            return [], None
        return self._collect(result, limit, 1)

    async def _refresh(self, messages: list[InboundMessage]) -> list[InboundMessage]:
        # Reset the idle clock of entries read a while ago, unless another member claimed
        # them meanwhile (then their idle time is below their age here: not re-taken).
        now = time.monotonic()
        ages: dict[str, float] = {}
        for m in messages:
            ages[m.handle.stream] = min(ages.get(m.handle.stream, 1e18), now - m.handle.read_at)
        pipe = self._client.pipeline(transaction=False)
        for key, ids in _by_stream(messages).items():
            idle_ms = max(0, int(ages[key] * 1000) - 50)
            pipe.xclaim(key, self.group, self._consumer, idle_ms, ids, justid=True)
        results = await pipe.execute(raise_on_error=False)
        still: set[bytes] = set()
        for result in results:
            if not isinstance(result, BaseException):
                still.update(result)
        return [m for m in messages if m.handle.entry_id in still]

    async def _settle(self, messages: Sequence[InboundMessage], idle: int | None) -> None:
        if not messages:
            return
        # Run in its own task: a caller cancelled mid-command (the core cancels its ack
        # task on stop) must see the cancellation at once, and redis-py must never get a
        # chance to swallow it; the settling itself completes either way.
        await asyncio.shield(asyncio.ensure_future(self._settle_now(messages, idle)))

    async def _settle_now(self, messages: Sequence[InboundMessage], idle: int | None) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, ids in _by_stream(messages).items():
            if idle is None:
                pipe.xack(key, self.group, *ids)
            else:
                pipe.xclaim(key, self.group, self._consumer, 0, ids, idle=idle, justid=True)
        try:
            await pipe.execute()
        except _CLIENT_ERRORS as exc:
            raise BackendConnectionError(
                self._transport.error(f"settling {len(messages)} message(s)", exc)
            ) from exc

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        await self._settle(messages, None)

    async def nack(self, messages: Sequence[InboundMessage], delay: float = 0.0) -> None:
        idle = _HANDED_BACK_IDLE_MS if delay <= 0 else max(0, self._ack_ms - int(delay * 1000))
        await self._settle(messages, idle)
        if delay <= 0:
            self._next_claim = 0.0
        else:
            self._next_claim = min(self._next_claim, time.monotonic() + delay)

    async def extend(self, messages: Sequence[InboundMessage]) -> None:
        await self._settle(messages, 0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        buffered = list(self._buffer)
        self._buffer.clear()
        with contextlib.suppress(AgentEventsError):
            await self._settle(buffered, _HANDED_BACK_IDLE_MS)
        with contextlib.suppress(*_CLIENT_ERRORS):
            await self._leave()

    async def _leave(self) -> None:
        """Delete this member's consumer from streams where it holds nothing pending.

        Consumers holding entries stay (``XGROUP DELCONSUMER`` would drop their entries
        from the pending list); other members claim those after ``ack_timeout``.
        """
        keys = list(self._streams)
        if not keys:
            return
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.xpending_range(key, self.group, "-", "+", 1, self._consumer)
        pending = await pipe.execute(raise_on_error=False)
        empty = [k for k, p in zip(keys, pending, strict=True) if p == []]
        if empty:
            pipe = self._client.pipeline(transaction=False)
            for key in empty:
                pipe.xgroup_delconsumer(key, self.group, self._consumer)
            await pipe.execute(raise_on_error=False)


class RedisEphemeralReceiver(_StreamReceiver):
    """An ephemeral subscriber (``group=None``): ``XREAD`` from remembered positions."""

    def __init__(self, transport: RedisTransport, spec: ConsumerSpec) -> None:
        super().__init__(transport, spec)
        self._from = "0-0"
        self._handed_back: list[tuple[float, InboundMessage]] = []

    async def start(self) -> None:
        self._from = _after(await self._transport.server_ms())
        keys = [self._config.stream_key(t) for t in await self._matching_types()]
        if not keys:
            return
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.xrevrange(key, "+", "-", count=1)
        for key, last in zip(keys, await pipe.execute(), strict=True):
            self._streams[key] = last[0][0] if last else self._from

    async def _add_streams(self, keys: list[str]) -> None:
        for key in keys:
            self._streams.setdefault(key, self._from)

    def _claim_wait(self) -> float:
        if not self._handed_back:
            return BLOCK_CAP
        return max(0.0, min(due for due, _ in self._handed_back) - time.monotonic())

    async def _due(self, limit: int) -> list[InboundMessage]:
        if not self._handed_back:
            return []
        now = time.monotonic()
        ready = [item for item in self._handed_back if item[0] <= now][:limit]
        for item in ready:
            self._handed_back.remove(item)
        return [message for _, message in ready]

    async def _read(
        self, limit: int, block: float | None, only: list[str] | None = None
    ) -> tuple[list[InboundMessage], Order | None]:
        keys = list(only or self._streams)
        result = await self._transport.namespace_command(
            "XREAD", *_read_options(limit, block), "STREAMS", *keys,
            *(self._streams[key] for key in keys),
        )
        return self._collect(result, limit, 1, self._streams.__setitem__)

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        return None

    async def nack(self, messages: Sequence[InboundMessage], delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        for message in messages:
            message.delivery_count += 1
            self._handed_back.append((due, message))

    async def extend(self, messages: Sequence[InboundMessage]) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
        self._buffer.clear()
        self._handed_back.clear()
