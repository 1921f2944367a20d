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
    Every read of a receiver is followed, in the same round trip, by ``SCARD`` of this
    set; when it grew, the receiver re-reads it (``SMEMBERS``) and joins the new matching
    streams, so ``code.>`` receives ``code.build.failed`` first published later. The first
    event of a brand-new type may therefore wait up to one blocking read (<= 1 s) before
    a wildcard subscriber sees it.
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

Receiving (one member): ``XREADGROUP ... BLOCK <= 1 s COUNT n STREAMS <all matching> >``
followed by ``SCARD <prefix>:types`` in the same round trip. Entries of several streams
are merged in publish order as far as Redis can tell: by the entry's millisecond (the
server's clock, one for all streams), then ``pt``, then the entry's sequence number.
``pt`` is given in the order entries go into a publish pipeline and never repeats or
decreases within one transport (``max(last + 1, now in µs)``), so a lone member sees one
publisher's events in its publish order even when a key's events have different types and
their event ids are not in publish order (ids minted long before publishing, as by an
outbox relay: the event id plays no part). Entries of different publishers within one
Redis millisecond are ordered by their clocks, which is the best Redis can tell about
events that were published concurrently. Entries without a numeric ``pt`` (written by
other clients) order as ``pt = 0``: first within their millisecond.

The merge hands an entry out only when no stream can still hold an unread entry that
sorts before it (see ``_StreamReceiver`` for the reasoning). Redis applies ``COUNT`` per
stream: a stream that returned ``n`` entries may hold more, from the millisecond of its
last one on; a stream that returned fewer held nothing more when it was read. So after
each read, entries of milliseconds below the smallest last millisecond of a full stream
are complete and handed out in order; later ones wait in a local buffer (they are already
in this member's pending list) for the next read, which follows at once, without
blocking. Every read reads every stream except those whose last entry is already past
that horizon (they count as full there: nothing they return could be handed out yet), so
the buffer holds about ``n`` entries per stream, whatever the backlogs. A read that finds
the type registry grown joins the new streams and hands nothing out until they have been
read too. A group read is never sent twice: one that failed (connection lost, timed out,
cancelled) may have run, and given its entries to this member; the next read then asks
for this member's own pending entries after the last id it read of each stream
(``XREADGROUP ... STREAMS <keys> <those ids>``), merged as usual, before reading ``>``
again. Buffered entries that
waited longer than ``ack_timeout / 4`` get their idle clock reset (``XCLAIM ... JUSTID``,
unless another member claimed them meanwhile) before they are handed out. Every
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

Connections: the hot paths (a publisher's pipelines, a member's reads and its
acknowledgements) each keep one connection and talk to it through redis-py's public
connection API: commands packed by this module, raw replies read back to back, one
timeout per round trip (``socket_timeout`` per MiB sent and expected, at least one).
Publish pipelines and group reads are never sent twice (the server may have run them
before the connection broke); a publisher whose connection is new registers every type
again (the server may have restarted empty). redis-py's per-command machinery (argument
encoding, a pool checkout, a task and a timeout per send, a timeout and a response
callback per reply) was the largest cost of publishing and consuming after decoding. On a
cluster these commands go as a redis-py pipeline to the namespace's node; everything else
goes through the redis-py client.

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
#: Poll interval while a receiver has no matching stream at all.
NO_STREAM_POLL = 0.1
_MAX_SEQ = 18446744073709551615
#: A horizon below every entry: nothing buffered is complete (see ``_StreamReceiver``).
_INCOMPLETE = -1
#: Idle time given to an entry handed back with no delay: any member's XAUTOCLAIM takes it.
_HANDED_BACK_IDLE_MS = 10**12
_MIB = 1 << 20
#: What a read first expects an entry to take on the wire (:meth:`_Line.run`'s
#: ``expect``); quadrupled, up to ``max_payload_bytes``, after a read that timed out.
_ENTRY_GUESS = 4 * 1024
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
    return _order_of(entry_id, (fields or {}).get(b"pt"))


def _order_of(entry_id: bytes, stamp: bytes | None) -> Order:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(stamp) if stamp and stamp.isdigit() else 0, int(seq or b"0")


def _id_key(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id as ``(millisecond, sequence)``, to compare ids."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or b"0")


def _after(server_ms: int) -> str:
    """A stream id just below every id Redis assigns from ``server_ms`` on."""
    return f"{server_ms - 1}-{_MAX_SEQ}" if server_ms > 0 else "0-0"


#: A delivered message's handle: ``(stream key, entry id, pt field or None, when this
#: member read it (monotonic: buffered entries age))``. A plain tuple: one is made per
#: message, on the hot path.
_Handle = tuple[str, bytes, bytes | None, float]


def _handle_order(message: InboundMessage) -> Order:
    """The sort key (:func:`_order`) of a message of this transport."""
    _stream, entry_id, stamp, _read_at = message.handle
    return _order_of(entry_id, stamp)


def _handle_ms(message: InboundMessage) -> int:
    """The Redis millisecond of a message's entry id."""
    return int(message.handle[1].partition(b"-")[0])


def _message(stream: str, entry_id: bytes, fields: dict[bytes, bytes] | None,
             count: int) -> InboundMessage | None:
    if fields is None:  # deleted (trimmed) while pending
        return None
    topic = fields.get(b"type")
    return InboundMessage(
        body=fields.get(b"body", b""),
        topic=topic.decode("utf-8", "replace") if topic else stream.rsplit(":", 1)[-1],
        delivery_count=count,
        handle=(stream, entry_id, fields.get(b"pt"), time.monotonic()),
    )


def _by_stream(messages: Iterable[InboundMessage]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for message in messages:
        handle: _Handle = message.handle
        out.setdefault(handle[0], []).append(handle[1])
    return out


def _pack(commands: Iterable[Sequence[Any]]) -> bytes:
    """Commands in the Redis protocol (RESP), ready to send together; arguments are
    ``bytes`` (or another bytes-like object), ``str`` (sent as UTF-8) or ``int``."""
    out: list[bytes] = []
    append = out.append
    for args in commands:
        append(b"*%d\r\n" % len(args))
        for arg in args:
            if type(arg) is not bytes:
                if isinstance(arg, str):
                    arg = arg.encode()
                elif isinstance(arg, int):
                    arg = b"%d" % arg
                else:
                    arg = bytes(arg)
            append(b"$%d\r\n" % len(arg))
            append(arg)
            append(b"\r\n")
    return b"".join(out)


class _Line:
    """A connection kept by one user for its commands: a receiver's reads, its settling,
    the publisher's pipelines.

    The hot paths skip redis-py's per-command machinery (argument encoding, a task and a
    timeout per send, a timeout context and a response callback per reply, a pool
    checkout per call): commands are packed here and sent together, and their raw
    replies read back to back under one timeout per round trip (scaled by its size),
    through redis-py's public connection API (``send_packed_command``,
    ``read_response``) on connections of a pool without a socket timeout of its own. A
    command the server refused comes back as its ``ResponseError``. A round trip that
    fails or is cancelled half-way closes its connection (replies may be left unread); a
    broken connection is replaced, and the commands sent once more, unless ``retry`` is
    false (publish pipelines and group reads: the server may have run them). A kept
    connection the server closed meanwhile is replaced before anything is sent on it.
    On a cluster the commands go, as a redis-py pipeline, to the node owning the
    namespace (their replies then pass through redis-py's response callbacks).
    """

    def __init__(self, transport: RedisTransport) -> None:
        self._transport = transport
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._dropping: set[asyncio.Task[None]] = set()

    async def fresh(self) -> bool:
        """Whether the next round trip starts on a new connection: none is kept (never
        had one, or the last one failed), or the server closed the kept one meanwhile
        (restart, idle timeout; it is dropped now, before anything is sent on it)."""
        if isinstance(self._transport.client, RedisCluster):
            return False  # (redis-py keeps the cluster's connections)
        conn = self._conn
        if conn is None:
            return True
        try:
            check = getattr(conn, "can_read", None) or conn.can_read_destructive  # (< 8)
            stale = bool(await check())
        except (redis_errors.ConnectionError, OSError):
            stale = True
        if stale and self._conn is conn:
            self._conn = None
            self._drop(conn)
        return stale

    async def run(self, commands: Sequence[Sequence[Any]], wait: float = 0.0,
                  retry: bool = True, expect: int = 0) -> list[Any]:
        """Send ``commands`` together; their replies in order. ``wait``: how long a
        blocking command may take beyond the socket timeout. ``retry``: on a broken
        connection, send them once more on a new one; only for what may run twice (the
        server may have run them before the connection broke): never a group read or an
        ``XADD``. ``expect``: about how many bytes the replies may take.

        The round trip's deadline is ``socket_timeout`` per MiB sent and expected (at
        least one ``socket_timeout``), plus ``wait``: a big pipeline or reply is not cut
        off for its size."""
        transport = self._transport
        client: Any = transport.client
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(transport.config.types_key)
            pipe = client.pipeline()
            for args in commands:
                # (redis-py parses an XCLAIM reply as entries unless told it is ids)
                options = {"parse_justid": True} if args[0] == "XCLAIM" else {}
                pipe.execute_command(*args, target_nodes=node, **options)
            return list(await pipe.execute(raise_on_error=False))
        data = _pack(commands)
        timeout = (transport.config.socket_timeout * (1.0 + (len(data) + expect) / _MIB)
                   + wait)
        async with self._lock:
            try:
                return await self._send(data, len(commands), timeout)
            except redis_errors.ConnectionError:
                if not retry:
                    raise
            return await self._send(data, len(commands), timeout)

    async def _send(self, data: bytes, replies: int, timeout: float) -> list[Any]:
        await self.fresh()  # (replaces a connection the server closed: nothing sent yet)
        conn = self._conn
        if conn is None:
            pool: Any = self._transport._line_client.connection_pool
            try:
                conn = await pool.get_connection()
            except TypeError:  # redis-py < 5.3 wants a command name
                conn = await pool.get_connection("PING")
            self._conn = conn
        try:
            async with asyncio.timeout(timeout):
                await conn.send_packed_command(data, check_health=False)
                out: list[Any] = []
                for _ in range(replies):
                    try:
                        out.append(await conn.read_response())
                    except redis_errors.ResponseError as exc:
                        out.append(exc)
            return out
        except BaseException:
            # Replies may be left unread: the connection goes back to the pool closed
            # (redis-py reconnects it on its next use), in a task of its own, so that a
            # cancelled caller does not have to wait for it.
            self._conn = None
            self._drop(conn)
            raise

    def _drop(self, conn: Any) -> None:
        task = asyncio.ensure_future(self._give_back(conn, close=True))
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _give_back(self, conn: Any, close: bool) -> None:
        client: Any = self._transport._line_client
        with contextlib.suppress(Exception):
            if close:
                await conn.disconnect()
            await client.connection_pool.release(conn)

    async def close(self) -> None:
        """Give the connection back to the pool."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await self._give_back(conn, close=False)


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
        #: Where :class:`_Line` connections come from (single server): a pool without a
        #: socket timeout, so that redis-py adds none per send and per reply (a line puts
        #: one timeout around each round trip instead).
        self._line_client = aioredis.Redis(
            db=config.db, **{**config.client_options(), "socket_timeout": None})
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
        #: The connection publishing pipelines go through (one at a time).
        self._line = _Line(self)
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
        if await self._line.fresh():
            # A new connection: the server may have come back empty (restarted without
            # persistence), so every type is registered again.
            self._known_types.clear()
        commands: list[list[Any]] = []
        owners: list[int] = []
        adding: dict[str, int] = {}
        for index, (messages, future) in enumerate(batch):
            if future.done():  # the caller was cancelled before we got to it
                continue
            for message in messages:
                topic = message.topic
                if topic not in self._known_types and topic not in adding:
                    adding[topic] = len(owners)
                    commands.append(["SADD", config.types_key, topic])
                    owners.append(index)
                commands.append(_xadd(config, message, self._stamp()))
                owners.append(index)
        if not owners:
            return
        failed: dict[int, BaseException] = {}
        try:
            # Never sent twice: the server may have run the pipeline before the
            # connection broke (duplicates, and out of order with what follows).
            results = await self._line.run(commands, retry=False)
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
        await self._line.close()
        await self.client.aclose()
        await self._line_client.aclose()


def _read_options(count: int, block: float | None) -> list[Any]:
    """``COUNT n [BLOCK ms]`` of an ``XREAD`` / ``XREADGROUP``."""
    options: list[Any] = ["COUNT", count]
    if block is not None:
        options += ["BLOCK", max(1, int(block * 1000))]
    return options


def _xadd(config: RedisBusConfig, message: OutboundMessage, stamp: int) -> list[Any]:
    """The ``XADD`` of an event: its flat fields (see the module doc), ``stamp`` its ``pt``."""
    topic = message.topic
    args: list[Any] = ["XADD", config.stream_key(topic)]
    if config.maxlen is not None:
        args += ("MAXLEN", "~", config.maxlen)
    args += ("*", "id", message.id, "type", topic)
    if message.key is not None:
        args += ("key", message.key)
    event = message.event
    if event is not None:
        args += ("source", event.source, "time", event.time.isoformat())
    args += ("pt", stamp, "body", message.body)
    return args


class _StreamReceiver(Receiver):
    """What group members and ephemeral subscribers share: stream discovery, the merge.

    The merge of several streams, and when an entry may be handed out
    -----------------------------------------------------------------

    Invariant: an entry is handed out only when no stream this member reads can still
    hold an unread entry that sorts (:func:`_order`) before it. Entries are buffered
    (they are already pending for this member) and handed out in sort order while they
    are *complete*:

    * Every read reads every stream with one ``COUNT n`` (any stream may have grown
      since the previous read), except a stream whose last read entry's millisecond is
      above the horizon of the previous read while entries are buffered: whatever it
      holds unread is from that millisecond on (appended later), so it counts as a full
      stream that returned that entry, and reading it could only buffer entries that
      cannot be handed out yet. The stream(s) at the horizon are read, so it moves on.
    * A stream that returned fewer than ``n`` entries held nothing more when it was read:
      what it gets later is appended after every entry this member has read so far, and
      sorts after them (a later append has a later or equal millisecond and, from the same
      publisher, a higher ``pt``).
    * A stream that returned ``n`` entries may still hold more from the millisecond of its
      last one on (with any ``pt``: another publisher's clock), but none from an earlier
      millisecond. So after a read, buffered entries of milliseconds below the smallest
      such last millisecond are complete (``_horizon``); the rest wait for the next read.
    * A stream created before a read but not yet known to this member is a stream too:
      every read also counts the type registry (``SCARD``, sent right behind the read, so
      it sees every type registered before the read ran: a publisher registers a type
      before its first ``XADD``). When the count changed and a new stream matches, nothing
      is complete until the next read, which includes it.

    Each read narrows what is incomplete (full streams advance by ``n`` each time, and
    their milliseconds only grow), so a waiting entry is handed out after finitely many
    reads; nothing is ever handed out past the horizon to make progress. Redeliveries
    (claimed or handed back) do not go through the merge: they are older than anything
    buffered, and are handed out as they come.

    A group read that failed may have run (its entries are then this member's, pending):
    the next read recovers them first (see :class:`RedisReceiver`), and hands nothing out
    until they are all in and the streams have been read on.

    One limit, below Redis 7.2 only: a blocked read is answered with the one stream that
    woke it (7.2 reads all of them again). That stream's reply is its oldest news, since
    every ``XADD`` wakes the reader before the next command runs, except when one command
    appends to several streams (``MULTI``/``EXEC`` or a script): entries another client
    writes to several streams in one transaction may then be merged out of order. This
    transport's publishers never do that.
    """

    def __init__(self, transport: RedisTransport, spec: ConsumerSpec) -> None:
        self._transport = transport
        self._config = transport.config
        self._client: Any = transport.client  # redis-py stubs type replies as unions
        self._spec = spec
        self._pattern: Pattern = spec.pattern
        self._streams: dict[str, Any] = {}  # stream key -> read position / marker
        #: Size of the type registry when this member last read it (-1: re-read it).
        self._types_seen = -1
        #: Entries read (so already pending for this member) but not handed out yet,
        #: sorted by :func:`_order`.
        self._buffer: list[InboundMessage] = []
        #: Buffered entries of Redis milliseconds below this are complete; ``None``: all
        #: of them (see the class docstring).
        self._horizon: int | None = None
        self._closed = False
        self._block_cap = min(BLOCK_CAP, self._config.socket_timeout / 2)
        #: The connection this member reads on, and the one it settles messages on.
        self._reads = _Line(transport)
        self._settles = _Line(transport)
        #: Event type names, decoded once.
        self._topics: dict[bytes, str] = {}
        #: The id of the last entry each stream returned to a read (buffered or handed
        #: out): where a recovery read (:class:`RedisReceiver`) resumes, and the bound of
        #: a stream that is not read (see the class docstring).
        self._last_ids: dict[str, bytes] = {}
        #: Whether the next read must first recover this member's own pending entries that
        #: a failed read may have been given (group members only; see ``RedisReceiver``).
        self._recovering = False
        #: What an entry is expected to take on the wire (a read's timeout scales with
        #: it); grows after a read that timed out.
        self._entry_guess = _ENTRY_GUESS

    async def _read_streams(self, *args: Any, block: float | None, expect: int,
                            retry: bool = True) -> tuple[Any, int]:
        """Run the read ``args``, and ``SCARD`` of the type registry sent right behind it
        (the server runs it as soon as the read returns, so it counts every type
        registered before the read ran), in one round trip. ``expect``: how many entries
        the read may return (its timeout scales with their size)."""
        try:
            reply, count = await self._reads.run(
                [args, ("SCARD", self._config.types_key)], wait=block or 0.0,
                retry=retry, expect=expect * self._entry_guess)
        except TimeoutError:  # a slow big reply? give the next read more time
            self._entry_guess = min(self._entry_guess * 4,
                                    max(self._config.max_payload_bytes, _ENTRY_GUESS))
            raise
        for result in (reply, count):
            if isinstance(result, BaseException):
                raise result
        return reply, int(count)

    async def start(self) -> None:
        """Create or join the consumer; every matching stream is known when this returns."""
        raise NotImplementedError  # pragma: no cover - overridden

    async def _matching_types(self) -> list[str]:
        members = await self._client.smembers(self._config.types_key)
        self._types_seen = len(members)
        return sorted(t for t in (_text(m) for m in members) if self._pattern.matches(t))

    async def _discover(self, count: int | None = None) -> bool:
        """Join the matching streams created since the registry was last read; ``count``
        is the registry's size if the caller just read it. True if a stream was added."""
        if count is None:
            count = await self._client.scard(self._config.types_key)
        if count == self._types_seen:
            return False
        keys = [self._config.stream_key(t) for t in await self._matching_types()]
        new = [key for key in keys if key not in self._streams]
        if new:
            await self._add_streams(new)
        return bool(new)

    async def _add_streams(self, keys: list[str]) -> None:
        raise NotImplementedError  # pragma: no cover - overridden

    async def _due(self, limit: int) -> list[InboundMessage]:
        """Redeliveries due now (claimed or handed back)."""
        return []

    def _claim_wait(self) -> float:
        """Seconds until :meth:`_due` may have something."""
        return BLOCK_CAP

    async def _fetch(self, keys: list[str], count: int,
                     block: float | None) -> tuple[Any, int] | None:
        """One ``XREAD``/``XREADGROUP`` of the streams ``keys``, and the size of the type
        registry right after it; ``None`` if the read could not be made (it is made
        again)."""
        raise NotImplementedError  # pragma: no cover - overridden

    def _recovered(self, messages: list[InboundMessage]) -> list[InboundMessage]:
        """What a recovery read returned, less what this member already has."""
        return messages

    async def _refresh(self, messages: list[InboundMessage]) -> list[InboundMessage]:
        """Buffered messages about to be handed out late: keep them ours (groups)."""
        return messages

    async def _read(self, count: int, block: float | None) -> int:
        """Read every stream once (``COUNT count``), buffer what came in sort order, and
        set the horizon (see the class docstring). Returns how many entries came."""
        keys = list(self._streams)
        bounds: list[int] = []  # the last milliseconds of the streams not read
        horizon = self._horizon
        if (self._buffer and horizon is not None and horizon != _INCOMPLETE
                and len(keys) > 1 and not self._recovering):
            # A stream whose last entry is past the horizon is not read: nothing it can
            # return could be handed out before the horizon passes that entry (its unread
            # entries are no earlier), so it counts as a full stream bounded there. The
            # stream(s) at the horizon are read, so it moves on; the buffer stays at about
            # ``count`` entries per stream, however long the backlogs.
            last_ids = self._last_ids
            read: list[str] = []
            for key in keys:
                last = last_ids.get(key)
                ms = int(last.partition(b"-")[0]) if last is not None else -1
                if ms > horizon:
                    bounds.append(ms)
                else:
                    read.append(key)
            keys = read
        recovering = self._recovering
        fetched = await self._fetch(keys, count, block)
        if fetched is None:
            self._horizon = _INCOMPLETE
            return 0
        reply, types = fetched
        new, horizon = self._collect(reply, count)
        if recovering:
            # This member's own pending entries a failed read was given: a stream that
            # returned ``count`` may hold more of them. Nothing is complete until they
            # are all in and the streams have been read on (``>``) once more.
            self._recovering = horizon is not None
            new = self._recovered(new)
            horizon = _INCOMPLETE
        for ms in bounds:
            horizon = ms if horizon is None else min(horizon, ms)
        if types != self._types_seen and await self._discover(types):
            horizon = _INCOMPLETE  # a new stream may hold older entries: read it first
        elif len(self._streams) == 1:
            horizon = None  # a lone stream: what it still holds comes after what it gave
        if new:
            buffer = self._buffer
            buffer += new
            if len(self._streams) > 1:  # (one stream's entries come in its own order)
                buffer.sort(key=_handle_order)
        self._horizon = horizon
        return len(new)

    def _collect(self, reply: Any, count: int) -> tuple[list[InboundMessage], int | None]:
        """Messages of an ``XREAD(GROUP)`` reply of every stream, and the horizon: the
        smallest millisecond of the last entry of a stream that returned ``count``."""
        out: list[InboundMessage] = []
        append = out.append
        horizon: int | None = None
        topics = self._topics
        now = time.monotonic()
        if isinstance(reply, dict):  # RESP3: a map of stream -> entries
            reply = reply.items()
        for stream, entries in reply or ():
            key = _text(stream)
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending
                    continue
                if (type(fields) is list and len(fields) >= 8 and fields[2] == b"type"
                        and fields[-4] == b"pt" and fields[-2] == b"body"):
                    # A raw reply of this transport's own layout: id, type, ..., pt, body
                    name, stamp, body = fields[3], fields[-3], fields[-1]
                else:
                    if type(fields) is list:  # [name, value, name, value, ...]
                        pairs = iter(fields)
                        fields = dict(zip(pairs, pairs, strict=False))
                    name, stamp = fields.get(b"type"), fields.get(b"pt")
                    body = fields.get(b"body", b"")
                topic = topics.get(name) if name else None
                if topic is None:
                    topic = name.decode("utf-8", "replace") if name else key.rsplit(":", 1)[-1]
                    if name:
                        topics[name] = topic
                append(InboundMessage(body, topic, 1, None, (key, entry_id, stamp, now)))
            if entries:
                last = entries[-1][0]
                self._last_ids[key] = last
                self._remember(key, last)
                if len(entries) >= count:
                    ms = int(last.partition(b"-")[0])
                    horizon = ms if horizon is None else min(horizon, ms)
        return out, horizon

    def _remember(self, stream: str, last: bytes) -> None:
        """The last entry id ``stream`` returned (receivers that track positions)."""

    async def _hand_out(self, limit: int) -> list[InboundMessage]:
        """Up to ``limit`` buffered entries, in order, that are complete."""
        buffer, horizon = self._buffer, self._horizon
        take = min(limit, len(buffer))
        if horizon is not None:
            for index in range(take):
                if _handle_ms(buffer[index]) >= horizon:
                    take = index
                    break
        if not take:
            return []
        out = buffer[:take]
        del buffer[:take]
        cutoff = time.monotonic() - self._spec.ack_timeout / 4
        stale = [m for m in out if m.handle[3] < cutoff]
        if stale:
            keep = {id(m) for m in await self._refresh(stale)}
            out = [m for m in out if m.handle[3] >= cutoff or id(m) in keep]
        return out

    async def receive(self, max_messages: int, timeout: float) -> Sequence[InboundMessage]:
        if self._closed:
            return []
        limit = max(1, max_messages)
        deadline = time.monotonic() + timeout
        if not self._buffer:
            # About to go to the server: first let what the previous batch woke (the
            # handlers) run, rather than make them wait for this round trip to be sent.
            await asyncio.sleep(0)
        try:
            while not self._closed:
                if self._buffer:
                    out = await self._hand_out(limit)
                    if out:
                        return out
                remaining = deadline - time.monotonic()
                if not self._streams:
                    await self._discover()
                    if self._streams:
                        continue
                    if remaining <= 0:
                        return []
                    await asyncio.sleep(min(remaining, NO_STREAM_POLL))
                    continue
                due = await self._due(limit)
                if due:
                    return due
                if self._buffer:  # entries wait for the streams to be read on: no waiting
                    block = None
                else:
                    wait = min(remaining, self._block_cap, self._claim_wait())
                    block = wait if wait > 0.001 else None
                got = await self._read(limit, block)
                if not got and not self._buffer and remaining <= 0:
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
        #: Entries claimed (``XAUTOCLAIM``) and handed out whose id is above their
        #: stream's last read id: a recovery read would return them again.
        self._claimed_ahead: set[tuple[str, bytes]] = set()

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
        mine = {m.handle[:2] for m in self._buffer}
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, BaseException):
                if "NOGROUP" in str(result):  # the stream or group was deleted: re-create
                    await self._create_groups([key], self._late_start)
                    self._types_seen = -1  # and re-read the registry (server restarted?)
                    continue
                raise result
            for entry in result[1]:
                if entry and entry[1] is not None and (key, entry[0]) not in mine:
                    claimed.append((key, entry[0], entry[1]))
        if not claimed:
            return []
        if self._claimed_ahead:
            self._forget_claimed()
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
                last = self._last_ids.get(key)
                if last is None or _id_key(entry_id) > _id_key(last):
                    self._claimed_ahead.add((key, entry_id))
        out.sort(key=_handle_order)
        return out

    async def _fetch(self, keys: list[str], count: int,
                     block: float | None) -> tuple[Any, int] | None:
        # ``>`` reads are never sent twice, and a read that failed (connection lost,
        # timed out, cancelled) may still have run: the server then gave its entries to
        # this member, and a new ``>`` read would get the ones after them, handing them
        # out first (they would wait in this member's pending list until XAUTOCLAIM).
        # So the next read asks for this member's own pending entries after the last id
        # it saw of each stream first (an explicit id instead of ``>``).
        if self._recovering:
            keys = list(self._streams)
            ids: list[Any] = [self._last_ids.get(key, b"0-0") for key in keys]
            block = None
        else:
            ids = [">"] * len(keys)
        try:
            return await self._read_streams(
                "XREADGROUP", "GROUP", self.group, self._consumer, *_read_options(count, block),
                "STREAMS", *keys, *ids, block=block, expect=count * len(keys), retry=False,
            )
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                self._recovering = True  # (the read may have run: only SCARD failed)
                raise
            # A stream or the group was deleted (or the server restarted empty): create
            # them again where the group starts, and re-read the type registry.
            await self._create_groups(keys, self._late_start)
            for key in keys:
                self._last_ids.pop(key, None)
            self._types_seen = -1
            return None
        except BaseException:
            self._recovering = True
            raise

    def _recovered(self, messages: list[InboundMessage]) -> list[InboundMessage]:
        ahead = self._claimed_ahead
        if ahead:
            messages = [m for m in messages if m.handle[:2] not in ahead]
            self._forget_claimed()
        return messages

    def _forget_claimed(self) -> None:
        """Forget claimed entries a recovery read can no longer return."""
        last_ids = self._last_ids
        for key, entry_id in list(self._claimed_ahead):
            last = last_ids.get(key)
            if last is not None and _id_key(entry_id) <= _id_key(last):
                self._claimed_ahead.discard((key, entry_id))

    async def _refresh(self, messages: list[InboundMessage]) -> list[InboundMessage]:
        # Reset the idle clock of entries read a while ago, unless another member claimed
        # them meanwhile (then their idle time is below their age here: not re-taken).
        now = time.monotonic()
        ages: dict[str, float] = {}
        for m in messages:
            stream, read_at = m.handle[0], m.handle[3]
            ages[stream] = min(ages.get(stream, 1e18), now - read_at)
        pipe = self._client.pipeline(transaction=False)
        for key, ids in _by_stream(messages).items():
            idle_ms = max(0, int(ages[key] * 1000) - 50)
            pipe.xclaim(key, self.group, self._consumer, idle_ms, ids, justid=True)
        results = await pipe.execute(raise_on_error=False)
        still: set[bytes] = set()
        for result in results:
            if not isinstance(result, BaseException):
                still.update(result)
        return [m for m in messages if m.handle[1] in still]

    async def _settle(self, messages: Sequence[InboundMessage], idle: int | None) -> None:
        if not messages:
            return
        # Run in its own task: a caller cancelled mid-command (the core cancels its ack
        # task on stop) must see the cancellation at once, and redis-py must never get a
        # chance to swallow it; the settling itself completes either way.
        await asyncio.shield(asyncio.ensure_future(self._settle_now(messages, idle)))

    async def _settle_now(self, messages: Sequence[InboundMessage], idle: int | None) -> None:
        commands: list[list[Any]] = []
        for key, ids in _by_stream(messages).items():
            if idle is None:
                commands.append(["XACK", key, self.group, *ids])
            else:
                commands.append(["XCLAIM", key, self.group, self._consumer, 0, *ids,
                                 "IDLE", idle, "JUSTID"])
        try:
            results = await self._settles.run(commands)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
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
        await self._reads.close()
        await self._settles.close()

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

    async def _fetch(self, keys: list[str], count: int,
                     block: float | None) -> tuple[Any, int] | None:
        # (read from remembered positions: sending it twice is harmless)
        return await self._read_streams(
            "XREAD", *_read_options(count, block), "STREAMS", *keys,
            *(self._streams[key] for key in keys), block=block, expect=count * len(keys),
        )

    def _remember(self, stream: str, last: bytes) -> None:
        self._streams[stream] = last

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
        await self._reads.close()
