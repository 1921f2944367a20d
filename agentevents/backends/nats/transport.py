"""The NATS JetStream transport: ``nats://`` and ``tls://`` URLs.

URL::

    nats://[user:password@ | token@]host[:port][,host2[:port]...][?option=value&...]
    tls://...            (the same, over TLS; ``tls_ca``/``tls_cert``/``tls_key`` options)

Options (defaults in brackets):

* ``stream`` [``AGENTEVENTS``]: the JetStream stream holding every event. It is created
  idempotently on first use (an existing stream is used as it is, never modified).
* ``prefix`` [``agentevents``]: subject prefix; event type ``a.b.c`` is published on subject
  ``<prefix>.a.b.c`` and the stream captures ``<prefix>.>``.
* ``max_age`` [``7d``]: retention of the stream (``0`` keeps events until the limits below);
  seconds, or a number with ``s``/``m``/``h``/``d``. Retention policy: limits, discard old.
* ``replicas`` [``1``]: stream replicas (use 3 on a cluster).
* ``duplicate_window`` [``2m``]: window in which a repeated event id (``Nats-Msg-Id``) is
  stored once (``broker_dedupe``).
* ``max_payload`` [``1048576``]: the server's ``max_payload``. The transport declares
  ``max_payload_bytes = max_payload - 128`` (room for the ``Nats-Msg-Id`` header, which
  counts against the server's limit). It must be known before the connection exists (the
  bus reads it when it is built); after connecting, a smaller limit in the server's INFO
  is logged and enforced by ``send`` (``PayloadTooLargeError``).
* ``publish_timeout`` [``5``] seconds to wait for a PubAck; ``connect_timeout`` [``5``].
* ``token``: an auth token (alternative to ``token@host``); ``creds``: the path of a NATS
  user credentials file (user JWT + nkey seed, as ``nsc generate creds`` writes it; needs
  the ``nkeys`` package; percent-encode ``+``, ``&`` or ``#`` in the path). The file is
  checked before connecting: a missing one or one without both blocks is a
  ``BackendConnectionError`` naming the path, never its contents. ``tls_ca``, ``tls_cert``,
  ``tls_key``: PEM files for TLS (``tls://`` alone uses the system trust store; with
  ``tls_cert``/``tls_key`` the client presents a certificate, for servers with
  ``verify: true``).
* A server that refuses the credentials (``Authorization Violation``, an expired JWT) fails
  the first connect at once, with what to check, instead of being retried until
  ``connect_timeout``.
* ``name``: the client connection name shown by the server [``agentevents``].

Mapping (see ``docs/architecture.md``):

* publish: a request on ``<prefix>.<type>`` with header ``Nats-Msg-Id: <event id>``,
  awaiting the PubAck; ``publish_many`` keeps up to 1,000 publishes in flight, written to
  the connection in writes of about 4 MiB.
* group ``G`` on pattern ``P``: one durable pull consumer named from ``(G, P)`` (durable
  names allow no dots: a sanitised prefix plus a short hash), ``filter_subject``
  ``<prefix>.<P>`` (``*`` and ``>`` are NATS wildcards already), ``ack_wait`` = the
  subscription's ``ack_timeout``, ``max_deliver`` unlimited (the core dead-letters after
  ``max_attempts``), deliver policy ``all`` or ``new`` from ``start`` for a *new* group; an
  existing consumer is joined as it is (its ``ack_wait`` stays the one of the member that
  created it, and messages buffered by a member are kept alive within the shorter of the
  two; its ``max_batch``, if any, splits the pull requests; a new pattern makes a new
  consumer, the old one stays until deleted).
  Members share the consumer (load balancing).
* ephemeral subscriber: an unnamed pull consumer with deliver policy ``new``, deleted on
  close (and by the server after 5 minutes without pulls, should the process die).
* receive: pull requests (``$JS.API.CONSUMER.MSG.NEXT``, ``expires`` 0.3 s) answered on
  the receiver's own inbox subscription, whose messages go from nats-py's parser straight
  into the receiver's buffer (no ``Msg`` object, no header parsing, no per-message task
  as in nats-py's ``fetch`` or callbacks). Pulls are pipelined: what is buffered or still
  due from open requests is kept at the core's room plus ``2 x max_in_flight`` (a request
  goes out once it can ask for at least half of that), so the server fills the next batch
  while the core handles this one; a request is renewed 0.1 s before it expires, so none
  is ever missing. A new message wakes the core's ``receive`` at once (a future, not a
  poll). Ack ``+ACK`` (not awaited; the acks of one receiver are written at most every
  4 ms, the first after a pause at once; its close and the transport's close flush them),
  nack ``-NAK`` with a delay, extend ``+WPI`` (also for messages pulled but not yet taken
  by the core). ``delivery_count`` comes from the ack subject. Before
  messages are handed back at stop, the member's open pull requests are let expire (a
  nats-server 2.9 defect otherwise loses the hand-back until ``ack_wait``; see
  :meth:`NatsReceiver._end_requests`). The pull loop survives reconnects (nats-py
  resubscribes; no pull request is sent while disconnected, those sent before the
  disconnect are forgotten on reconnect and sent again). A pull refused over a limit of the
  consumer (``409 Exceeded ...``) is logged once; pulls then pause 1 s (or are split, for
  ``MaxRequestBatch``). Each step of a receiver's close (acks, end of the pulls, NAK of the
  buffered messages, deletion of an ephemeral consumer) runs even if an earlier one fails.
* dead letters: stream ``<stream>_DLQ`` on subjects ``<prefix>_dlq.<group token>`` (outside
  ``<prefix>.>``, so no subscription ever sees them); each message is the
  :class:`~agentevents.core.deadletter.DeadLetter` JSON with header ``Agentevents-Group``.
  The dead-letter stream has no ``max_age``: letters stay until an operator removes them
  (``nats stream purge <stream>_DLQ --subject <prefix>_dlq.<token>``).
* streams are only ever created, never updated or deleted: an existing stream is used as
  it is, provided it captures ``<prefix>.>`` (else a ``ConfigurationError``).

Capabilities: durable groups, replay, cross-process members and broker dedupe; *not*
``ordered_per_key`` (a consumer spreads one key's events over members; the core keeps a
key's order within one member).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import logging
import re
import ssl
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import nats
import nats.errors
import orjson
from nats.aio.client import Client as _NatsClient

from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import (
    BackendConnectionError,
    ConfigurationError,
    MissingDependencyError,
    PayloadTooLargeError,
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
    from collections.abc import Callable, Coroutine, Sequence

    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

    #: A direct handler: ``(subject, reply, data, headers)`` bytes as the parser read them.
    Direct = Callable[[bytes, bytes, bytes, bytes | None], None]

__all__ = ["NatsConfig", "NatsReceiver", "NatsTransport"]

log = logging.getLogger("agentevents.nats")

#: Bytes of ``max_payload`` kept for the headers we add (``Nats-Msg-Id: <uuid>``).
HEADER_RESERVE = 128
#: Publishes kept in flight at once by ``send``.
PUBLISH_WINDOW = 1000
#: An ephemeral consumer that nobody pulls from for this long is removed by the server.
EPHEMERAL_INACTIVE = 300.0
GROUP_HEADER = "Agentevents-Group"
#: Longest a pull request waits on the server (``receive`` pulls again within its timeout).
PULL_EXPIRES = 0.3
#: A request this close to its expiry no longer counts as coming: the next one is sent
#: while it is still open, so no message waits on the server for a new request.
PULL_RENEW = 0.1
#: A request neither completed nor ended by a status this long after its expiry is
#: forgotten (its status was lost, e.g. with a reconnect).
PULL_GRACE = 0.25
#: Messages a receiver pulls ahead of what the core has room for, per ``max_in_flight``:
#: enough to cover the server's answer to a pull request while it is also processing the
#: acks sent before it (several milliseconds on a busy machine).
PREFETCH = 2
#: Least time between two writes of one receiver's acks: the first ack after a pause is
#: written at once, later ones gather until this much time has passed since. At a few
#: thousand events per second every write would otherwise carry one ack, and a write to
#: the server costs more than anything else the consumer does per event.
ACK_INTERVAL = 0.004
#: Least time between two pull requests of one ``receive`` call whose first one ended empty.
PULL_PAUSE = 0.05
#: The same after the consumer refused a request over one of its limits (``409 Exceeded``).
PULL_REFUSED_PAUSE = 1.0
#: How often ``receive`` looks at the connection again while it is down (a reconnect wakes
#: it at once): no pull request is sent, nor buffered by nats-py, while disconnected.
OFFLINE_POLL = 0.1
#: Most pull requests sent at once when the consumer's ``max_batch`` splits a pull.
MAX_SPLIT = 8
#: Largest single write ``publish_many`` puts in nats-py's outgoing buffer.
PUBLISH_CHUNK = 4 * 1024 * 1024

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
#: What a subject may not contain (nats-py refuses it too: CR/LF would inject commands).
_BLANK = re.compile(r"\s")
_NO_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def _seconds(name: str, text: str) -> float:
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{name}={text!r} is not a duration (e.g. 30, 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _safe_token(text: str, length: int = 24) -> str:
    """``text`` as one subject token / consumer name: sanitised prefix + short hash."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
    readable = _UNSAFE.sub("_", text).strip("_")[:length]
    return f"{readable}_{digest}" if readable else digest


def _check_creds(path: str, shown: str) -> None:
    """Refuse a ``creds`` file that nats-py cannot use, before it tries.

    nats-py reads the file on every (re)connect and reports a missing one only as a retried
    connection error, and a file without the ``BEGIN NATS USER JWT`` block (e.g. a bare
    nkey seed file) makes it loop forever in a blocking read: the event loop hangs, no
    timeout fires. The contents are never quoted (the seed is a secret).
    """
    if importlib.util.find_spec("nkeys") is None:
        raise MissingDependencyError("NATS (for creds=)", None, "nkeys")
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise BackendConnectionError(
            f"NATS {shown}: cannot read the credentials file {path!r} (option creds): "
            f"{exc.strerror or exc}; give the path of a readable user .creds file "
            "(e.g. from `nsc generate creds`)") from exc

    def after(marker: str) -> str:
        for index, line in enumerate(lines[:-1]):
            if marker in line:
                return lines[index + 1].strip()
        return ""

    if after("BEGIN NATS USER JWT").count(".") != 2 or not after(
            "BEGIN USER NKEY SEED").startswith("SU"):
        raise BackendConnectionError(
            f"NATS {shown}: {path!r} (option creds) is not a NATS user credentials file: it "
            "needs a '-----BEGIN NATS USER JWT-----' block holding the user JWT and a "
            "'-----BEGIN USER NKEY SEED-----' block holding the user's seed (SU...), as "
            "written by `nsc generate creds`")


def _auth_refused(exc: BaseException) -> bool:
    """Whether the server rejected our credentials (retrying will not help)."""
    text = str(exc).lower()
    return "authorization violation" in text or "authentication expired" in text


def consumer_name(group: str, pattern: str) -> str:
    """The durable consumer name of ``group`` on ``pattern`` (valid, collision-free)."""
    return durable_name(group, pattern)


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """Everything a :class:`NatsTransport` needs; built from a URL by :meth:`from_url`."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    stream: str = "AGENTEVENTS"
    prefix: str = "agentevents"
    max_age: float = 7 * 86400.0
    replicas: int = 1
    duplicate_window: float = 120.0
    max_payload: int = 1024 * 1024
    publish_timeout: float = 5.0
    connect_timeout: float = 5.0
    name: str = "agentevents"

    def __post_init__(self) -> None:
        if not _NAME.match(self.stream):
            raise ConfigurationError(
                f"stream={self.stream!r}: a JetStream stream name allows letters, digits, "
                "'_' and '-' only")
        if not _TOKEN.match(self.prefix):
            raise ConfigurationError(
                f"prefix={self.prefix!r}: dot-separated tokens of letters, digits, '_', '-'")
        if self.replicas < 1:
            raise ConfigurationError(f"replicas={self.replicas}: must be at least 1")
        if self.max_payload <= HEADER_RESERVE:
            raise ConfigurationError(f"max_payload={self.max_payload} is too small")
        if self.max_age and self.duplicate_window > self.max_age:
            raise ConfigurationError("duplicate_window must not exceed max_age")
        for field_name in ("publish_timeout", "connect_timeout", "duplicate_window"):
            if getattr(self, field_name) <= 0:
                raise ConfigurationError(f"{field_name} must be positive (seconds)")

    @property
    def dlq_stream(self) -> str:
        """Name of the dead-letter stream."""
        return f"{self.stream}_DLQ"

    @property
    def dlq_prefix(self) -> str:
        """Subject prefix of dead letters (outside ``<prefix>.>``)."""
        return f"{self.prefix}_dlq"

    @classmethod
    def from_url(cls, url: str) -> NatsConfig:
        """Parse ``nats://`` / ``tls://`` URLs (see the module docstring)."""
        shown = redact_url(url)
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("nats", "tls"):
            raise ConfigurationError(f"NATS URL {shown!r}: the scheme must be nats:// or tls://")
        rest, _, _fragment = rest.partition("#")
        netloc, _, query_text = rest.partition("?")
        netloc = netloc.rstrip("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not at:
            userinfo, hosts = "", netloc
        kwargs: dict[str, Any] = {}
        if userinfo:
            if ":" in userinfo:
                user, password = userinfo.split(":", 1)
                kwargs["user"], kwargs["password"] = unquote(user), unquote(password)
            else:
                kwargs["token"] = unquote(userinfo)
        servers = []
        for host in (hosts or "127.0.0.1:4222").split(","):
            host = host.strip()
            if not host:
                continue
            if ":" not in host.rsplit("]", 1)[-1]:
                host = f"{host}:4222"
            servers.append(f"{scheme}://{host}")
        kwargs["servers"] = tuple(servers)
        kwargs["tls"] = scheme == "tls"
        query = {k: v[-1] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
        try:
            for name in ("stream", "prefix", "creds", "tls_ca", "tls_cert", "tls_key", "name",
                         "token"):
                if name in query:
                    kwargs[name] = query.pop(name)
            for name in ("max_age", "duplicate_window", "publish_timeout", "connect_timeout"):
                if name in query:
                    kwargs[name] = _seconds(name, query.pop(name))
            for name in ("replicas", "max_payload"):
                if name in query:
                    kwargs[name] = int(query.pop(name))
        except ValueError as exc:
            raise ConfigurationError(f"NATS URL {shown!r}: {exc}") from exc
        if query:
            raise ConfigurationError(
                f"NATS URL {shown!r}: unknown option(s) {', '.join(sorted(query))}; known: "
                "stream, prefix, max_age, replicas, duplicate_window, max_payload, "
                "publish_timeout, connect_timeout, token, creds, tls_ca, tls_cert, tls_key, "
                "name"
            )
        return cls(**kwargs)


class _ApiError(Exception):
    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


def _delivery_count(reply: bytes) -> int:
    tokens = reply.split(b".")
    try:
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[4])
        if len(tokens) >= 11:  # with domain and account hash
            return int(tokens[6])
    except ValueError:
        pass
    return 1


class _Client(_NatsClient):
    """nats-py's client with shortcuts on the hot paths.

    * :meth:`set_direct`: messages of a subscription registered there go from the protocol
      parser straight to a plain function, as the bytes it read: no parsing of the headers
      (JetStream sends the ``Nats-Msg-Id`` header with every message), no ``Msg`` object, no
      hop through the subscription's queue and its callback task. The subscription keeps
      its callback: a nats-py release that stopped calling ``_process_msg`` would deliver
      everything there, only slower.
    * :meth:`publish_each` (one payload, e.g. ``+ACK``, to many subjects) and
      :meth:`publish_with_ids` (events with their ``Nats-Msg-Id``) put a whole batch in the
      outgoing buffer as one command, rather than one ``publish`` (subject and header
      checks, command building, a flusher kick) per message. Both fall back to
      ``publish`` should nats-py's internals change.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Direct] = {}
        self._batched = True

    def set_direct(self, sid: int, handler: Direct | None) -> None:
        """Hand the messages of subscription ``sid`` to ``handler`` (``None``: stop)."""
        if handler is None:
            self._direct.pop(sid, None)
        else:
            self._direct[sid] = handler

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None, *more: Any, **named: Any) -> None:
        # (Any further arguments a later nats-py passes: its own path handles those.)
        direct = self._direct.get(sid)
        if direct is None or more or named or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers,  # type: ignore[arg-type]
                                       *more, **named)
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            direct(subject, reply, data, headers)
        except Exception:  # never let it reach the parser: that would drop the connection
            log.exception("handling a message on %r", subject)

    async def publish_each(self, subjects: Sequence[bytes], payload: bytes) -> None:
        """Publish ``payload`` to every subject of ``subjects`` (no reply, no headers)."""
        if not subjects:
            return
        if self._batched:
            tail = b" %d\r\n%s\r\n" % (len(payload), payload)
            command = b"".join([b"PUB " + subject + tail for subject in subjects])
            if await self._write(command, len(subjects), len(payload) * len(subjects)):
                return
        for subject in subjects:
            await self.publish(subject.decode(), payload)

    async def publish_with_ids(self, items: Sequence[tuple[str, str, bytes, str]]) -> None:
        """Publish each ``(subject, reply, body, msg_id)`` with header ``Nats-Msg-Id``."""
        if not items:
            return
        for subject, reply, _body, _msg_id in items:  # all checked before any is written
            if not subject or _BLANK.search(subject) or _BLANK.search(reply):
                raise nats.errors.BadSubjectError
        done = 0  # items written
        if self._batched:
            # Written in chunks of about PUBLISH_CHUNK bytes: a window of large events is
            # never copied into one huge bytes object.
            parts: list[bytes] = []
            length = size = 0
            for index, (subject, reply, body, msg_id) in enumerate(items):
                header = (f"NATS/1.0\r\nNats-Msg-Id: {msg_id.strip().translate(_NO_NEWLINES)}"
                          "\r\n\r\n").encode()
                line = (f"HPUB {subject} {reply} {len(header)} "
                        f"{len(header) + len(body)}\r\n").encode()
                parts += (line, header, body, b"\r\n")
                length += len(line) + len(header) + len(body) + 2
                size += len(body)
                if length >= PUBLISH_CHUNK or index == len(items) - 1:
                    if not await self._write(b"".join(parts), index + 1 - done, size):
                        break
                    done = index + 1
                    parts.clear()
                    length = size = 0
            if done == len(items):
                return
        for subject, reply, body, msg_id in items[done:]:
            await self.publish(subject, body, reply=reply, headers={"Nats-Msg-Id": msg_id})

    async def _write(self, command: bytes, messages: int, size: int) -> bool:
        """Queue protocol ``command`` (``messages`` messages of ``size`` payload bytes) as
        ``publish`` does; False if nats-py's internals changed (use ``publish``)."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        try:
            send, flush, queue = self._send_command, self._flush_pending, self._flush_queue
            pending, limit = self._pending_data_size, self._max_pending_size
        except AttributeError:
            log.debug("nats-py without _send_command: publishing one by one")
            self._batched = False
            return False
        if not self.is_connected and (limit <= 0 or len(command) + pending > limit):
            raise nats.errors.OutboundBufferLimitError
        await send(command)
        if queue is not None and queue.empty():
            await flush()
        stats = self.stats
        stats["out_msgs"] += messages
        stats["out_bytes"] += size
        return True


async def _open(options: dict[str, Any]) -> _Client:
    """``nats.connect(**options)``, with our client class."""
    nc = _Client()
    await nc.connect(**options)
    return nc


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class NatsReceiver(Receiver):
    """One member of one JetStream pull consumer; pulls on its own inbox."""

    def __init__(self, transport: NatsTransport, nc: _Client, consumer: str,
                 ephemeral: bool, ack_timeout: float, prefetch: int = 64,
                 ack_wait: float | None = None, max_batch: int = 0) -> None:
        self._transport = transport
        self._nc = nc
        self._config = transport.config
        self._consumer = consumer
        self._ephemeral = ephemeral
        self._strip = len(self._config.prefix) + 1
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._config.stream}.{consumer}"
        self._inbox = ""
        self._buffer: deque[InboundMessage] = deque()
        #: When the oldest buffered message arrived (or was last kept alive with ``+WPI``):
        #: set when the buffer fills from empty, so the later arrivals are kept alive early
        #: rather than late.
        self._buffered_since = 0.0
        #: Buffered messages are kept alive within the consumer's real ``ack_wait`` (that of
        #: the member that created it, when it is shorter than ours).
        if ack_wait is not None and 0 < ack_wait < ack_timeout:
            ack_timeout = ack_wait
        self._keep_alive_after = ack_timeout / 3
        #: Outstanding pull requests: reply token -> [messages still due, expiry time].
        self._requests: dict[str, list[float]] = {}
        self._serial = 0
        #: The serial of the last request sent before the connection was lost (see reset).
        self._lost_upto: int | None = None
        #: The consumer's ``max_batch`` (0: none): larger pulls are split.
        self._max_batch = max(0, max_batch)
        #: A request was refused over a consumer limit (409 "Exceeded ..."): warned once.
        self._limit_warned = False
        #: No pull before this time (a request was refused over a consumer limit).
        self._paused_until = 0.0
        #: Messages pulled ahead of what the core has room for (see :meth:`_want`).
        self._prefetch = max(1, prefetch)
        #: Futures of the tasks waiting for a message or for the end of a request.
        self._waiters: list[asyncio.Future[None]] = []
        #: Ack subjects not written yet, when the last were, and the timer of the next write.
        self._acks: list[bytes] = []
        self._acked_at = 0.0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_tasks: set[asyncio.Future[None]] = set()
        self._sub: Any = None
        self._closed = False
        self._warned = False
        #: A receive was cancelled and none started since: nobody pulls any more.
        self._halted = False

    @property
    def consumer(self) -> str:
        """The JetStream consumer name."""
        return self._consumer

    async def start(self) -> None:
        """Subscribe to a fresh inbox for the replies to our pull requests."""
        nc = self._nc
        self._inbox = nc.new_inbox()
        self._sub = sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        sid = getattr(sub, "_id", None)
        if isinstance(sid, int):
            nc.set_direct(sid, self._on_raw)

    async def _end_requests(self) -> None:
        """Wait (at most ``PULL_EXPIRES`` and a little) until our pull requests are over.

        Messages they still deliver land in the buffer. Needed before handing messages back
        once receiving stopped: nats-server 2.9 mishandles a waiting pull request whose
        reply subject lost its interest when the next message is a redelivery (it drops the
        redelivery from its queue and rewinds the stream cursor: the handed-back message
        comes back only after ``ack_wait``, and another one twice); and a request still
        open would take the handed-back messages straight back to this stopping member.
        """
        deadline = time.monotonic() + PULL_EXPIRES + PULL_GRACE + 0.05
        while self._sub is not None and self._open() and time.monotonic() < deadline:
            await self._wait(deadline - time.monotonic())

    async def _stop_pulling(self) -> None:
        """End our pull requests and unsubscribe, keeping what they delivered (buffer)."""
        if not self._ephemeral:  # an ephemeral consumer is deleted next: no need to wait
            await self._end_requests()
        sub, self._sub = self._sub, None
        self._requests.clear()
        if sub is not None:
            try:  # unsubscribe, then wait a round trip for messages already on their way
                await asyncio.wait_for(sub.drain(), max(self._config.publish_timeout, 1.0))
            except Exception as exc:  # disconnected: the server lost the requests anyway
                log.debug("draining the inbox of %s: %r", self._consumer, exc)
            sid = getattr(sub, "_id", None)
            if isinstance(sid, int):
                self._nc.set_direct(sid, None)

    def disconnected(self) -> None:
        """The connection was lost: the requests sent so far may be lost with it."""
        if self._lost_upto is None:
            self._lost_upto = self._serial
        self._signal()

    def reset(self) -> None:
        """Forget the pull requests sent before the connection was lost (the server lost
        them), on reconnect; those sent since (after nats-py reconnected, before it called
        us) are real and stay counted."""
        lost, self._lost_upto = self._lost_upto, None
        if lost is None:
            self._requests.clear()
        else:
            for token in [t for t in self._requests if int(t) <= lost]:
                del self._requests[token]
        self._signal()

    def _signal(self) -> None:
        """Wake the tasks waiting in :meth:`_wait`."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        """Until a message or the end of a request arrives, or ``timeout`` seconds pass.

        A bare future and a timer: a message wakes the receiving task directly, one
        event-loop step after the parser read it (``wait_for`` on an ``Event`` costs a
        task and two more steps).
        """
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(timeout, _settle, waiter)
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in self._waiters:  # (not woken by _signal)
                self._waiters.remove(waiter)

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes,
                headers: bytes | None) -> None:
        """A message on our inbox, straight from the parser (see :class:`_Client`)."""
        if reply[:8] == b"$JS.ACK.":
            self._on_message(subject, reply, data)
        elif headers and headers[8:9] == b" ":  # b"NATS/1.0 408 Request Timeout\r\n..."
            line = headers[9:].split(b"\r\n", 1)[0].decode("utf-8", "replace")
            status, _, description = line.partition(" ")
            self._on_status(subject.decode(), status, description)

    async def _on_msg(self, msg: Msg) -> None:
        """The same through nats-py's callback (used only without the direct path)."""
        reply = msg.reply
        if reply.startswith("$JS.ACK."):
            self._on_message(msg.subject.encode(), reply.encode(), msg.data)
        elif msg.headers and "Status" in msg.headers:
            self._on_status(msg.subject, msg.headers["Status"],
                            msg.headers.get("Description", ""))

    def _on_message(self, subject: bytes, reply: bytes, data: bytes) -> None:
        requests = self._requests
        if requests:  # attribute it to the oldest request still open
            token = next(iter(requests))
            request = requests[token]
            request[0] -= 1
            if request[0] <= 0:
                del requests[token]
        buffer = self._buffer
        if not buffer:
            self._buffered_since = time.monotonic()
        buffer.append(InboundMessage(
            data, subject[self._strip:].decode(), _delivery_count(reply), None, reply))
        if self._waiters:
            self._signal()

    def _on_status(self, subject: str, status: str, description: str) -> None:
        if status == "100":  # heartbeat / flow control: not an end
            return
        # 404/408/409/503: the request is over
        self._requests.pop(subject.rsplit(".", 1)[-1], None)
        if status == "409" and ("Exceeded" in description or "MaxBytes" in description):
            self._on_limit(description)
        gone = status == "503" or (status == "409" and "Deleted" in description)
        if gone and not self._warned:
            self._warned = True
            log.warning("NATS consumer %s on stream %s is gone (%s %s); this "
                        "subscription receives nothing until it is re-created",
                        self._consumer, self._config.stream, status, description)
        self._signal()

    def _on_limit(self, description: str) -> None:
        """A pull request refused over a limit of the consumer (``409 Exceeded ...``)."""
        match = re.search(r"MaxRequestBatch of (\d+)", description)
        if match and int(match.group(1)) > 0:
            # Split our pulls from now on: the next ones are accepted.
            self._max_batch = int(match.group(1))
            advice = (f"pulls are now split into batches of {self._max_batch}; raise or "
                      "remove the consumer's max_batch (max_request_batch) for fewer requests")
        else:
            self._paused_until = time.monotonic() + PULL_REFUSED_PAUSE
            advice = (f"pulling again every {PULL_REFUSED_PAUSE:g} s; raise the consumer's "
                      "limit (max_waiting, max_expires or max_bytes, e.g. with 'nats "
                      "consumer edit') or delete the consumer so that it is created again")
        if not self._limit_warned:
            self._limit_warned = True
            log.warning("NATS consumer %s on stream %s refused a pull request (409 %s): %s",
                        self._consumer, self._config.stream, description, advice)

    def _open(self) -> bool:
        """Whether a pull request of ours may still deliver (forgetting the lost ones)."""
        now = time.monotonic()
        for token, (_due, ends) in list(self._requests.items()):
            if ends + PULL_GRACE < now:
                del self._requests[token]
        return bool(self._requests)

    def _coming(self) -> int:
        """Messages our open pull requests may still deliver, but for those about to end."""
        now = time.monotonic()
        total = 0
        for token, (due, ends) in list(self._requests.items()):
            if ends + PULL_GRACE < now:
                del self._requests[token]
            elif ends - PULL_RENEW > now:
                total += int(due)
        return total

    def _next_renewal(self) -> float:
        """Seconds until the next open request stops counting as coming (see PULL_RENEW)."""
        now = time.monotonic()
        later = [ends - PULL_RENEW - now for _due, ends in self._requests.values()
                 if ends - PULL_RENEW > now]
        return min(later) if later else PULL_EXPIRES

    def _want(self, room: int) -> int:
        """How many messages to pull now (0: none) to keep the pipeline full.

        What is buffered or still coming should cover the core's ``room`` plus
        ``prefetch`` more: the server then prepares the next batch while the core handles
        this one, instead of the two taking turns (a round trip per batch). A request asks
        for at least half of that target, so a steady stream costs one request per half a
        target's worth of messages, not one per ``receive``.
        """
        target = room + self._prefetch
        want = target - len(self._buffer) - self._coming()
        return want if want >= max(1, target // 2) else 0

    async def _pull(self, count: int) -> bool:
        """Send pull requests for ``count`` messages (several when the consumer has a
        ``max_batch``); False if none went out (the connection is down or refused it)."""
        batch = self._max_batch
        sent = False
        for _ in range(MAX_SPLIT):
            if count <= 0 or not self._nc.is_connected:  # never buffer pulls in nats-py
                break
            size = min(count, batch) if batch > 0 else count
            count -= size
            self._serial += 1
            token = str(self._serial)
            self._requests[token] = [float(size), time.monotonic() + PULL_EXPIRES]
            request = b'{"batch":%d,"expires":%d}' % (size, _ns(PULL_EXPIRES))
            try:
                await self._nc.publish(self._next_subject, request,
                                       reply=f"{self._inbox}.{token}")
            except nats.errors.Error as exc:  # closed, or reconnecting with a full buffer
                self._requests.pop(token, None)
                log.debug("pull request on %s: %r", self._consumer, exc)
                break
            sent = True
        return sent

    def _take(self, max_messages: int) -> list[InboundMessage]:
        buffer = self._buffer
        count = min(max_messages, len(buffer))
        return [buffer.popleft() for _ in range(count)]

    async def receive(self, max_messages: int, timeout: float) -> Sequence[InboundMessage]:
        if self._closed:
            return []
        if self._sub is None:
            await self.start()
        self._halted = False
        try:
            return await self._receive(max_messages, timeout)
        except asyncio.CancelledError:
            # Cancelled (the core is stopping): no new pulls; a later nack first lets our
            # open pull requests end (see _end_requests).
            self._halted = True
            raise

    async def _receive(self, max_messages: int, timeout: float) -> list[InboundMessage]:
        deadline = time.monotonic() + timeout
        pulled_at: float | None = None
        while not self._closed:
            # Pull before taking: a cancellation while the request is sent loses nothing.
            # Not while disconnected: nats-py would buffer the requests and send them all
            # on reconnect (see reset).
            offline = not self._nc.is_connected
            want = self._want(max_messages) if not offline else 0
            if want and self._paused_until > time.monotonic():
                want = 0  # refused over a consumer limit: not again before the pause ends
            if want:
                if pulled_at is not None and not self._buffer:
                    # Our last request ended without a message (e.g. the consumer is
                    # gone): do not spin.
                    pause = min(pulled_at + PULL_PAUSE, deadline) - time.monotonic()
                    if pause > 0:
                        await self._wait(pause)
                        continue
                if await self._pull(want):
                    pulled_at = time.monotonic()
            if self._buffer:
                return self._take(max_messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self._wait(min(remaining, OFFLINE_POLL if offline or self._nc.is_closed
                                 else self._next_renewal()))
        return self._take(max_messages) if self._buffer else []

    async def _send(self, messages: Sequence[InboundMessage], payload: bytes) -> None:
        await self._nc.publish_each([message.handle for message in messages], payload)

    async def _keep_buffer_alive(self) -> None:
        """``+WPI`` messages pulled but not yet returned, before their ``ack_wait`` ends.

        A pull request may deliver more than the core takes at once (it asked for a batch
        while it had room); those wait here while the core is full.
        """
        if self._buffer and self._buffered_since < time.monotonic() - self._keep_alive_after:
            await self._send(list(self._buffer), b"+WPI")
            self._buffered_since = time.monotonic()

    async def ack(self, messages: Sequence[InboundMessage]) -> None:
        self._acks.extend([message.handle for message in messages])
        if self._ack_timer is None:
            loop = asyncio.get_running_loop()
            due = self._acked_at + ACK_INTERVAL
            if loop.time() >= due:
                await self._flush_acks()
            else:
                self._ack_timer = loop.call_at(due, self._acks_due)
        await self._keep_buffer_alive()

    async def flush_acks(self) -> None:
        """Write the acks still gathering at once (the transport's close calls it)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        await self._flush_acks()

    def _acks_due(self) -> None:
        self._ack_timer = None
        task = asyncio.ensure_future(self._flush_acks(raising=False))
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _flush_acks(self, raising: bool = True) -> None:
        """Write the acks gathered since the last write (see ``ACK_INTERVAL``)."""
        handles, self._acks = self._acks, []
        self._acked_at = asyncio.get_running_loop().time()
        if not handles:
            return
        try:
            await self._nc.publish_each(handles, b"+ACK")
        except Exception as exc:
            if raising:
                raise
            log.warning("NATS consumer %s: %d ack(s) not sent (%r); they are redelivered "
                        "after ack_wait", self._consumer, len(handles), exc)

    async def nack(self, messages: Sequence[InboundMessage], delay: float = 0.0) -> None:
        payload = b"-NAK" if delay <= 0 else b'-NAK {"delay":%d}' % _ns(delay)
        if self._halted and not self._ephemeral:
            await self._end_requests()
        await self._send(messages, payload)

    async def extend(self, messages: Sequence[InboundMessage]) -> None:
        await self._send(messages, b"+WPI")
        await self._keep_buffer_alive()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._signal()
        self._transport._receivers.discard(self)
        nc = self._nc
        if self._ack_timer is not None:  # (even if the acks cannot be written below)
            self._ack_timer.cancel()
            self._ack_timer = None
        # Each step on its own: one failing (e.g. the acks while reconnecting) must not
        # skip the others. Acks not written are redelivered after ack_wait, NAKs not
        # written likewise; nothing is lost.
        await self._close_step("writing the last acks", self.flush_acks())
        # End our open pull requests; messages delivered but never returned go back at once.
        await self._close_step("ending the pull requests", self._stop_pulling())
        if self._buffer:
            buffered = list(self._buffer)
            self._buffer.clear()
            await self._close_step(f"handing back {len(buffered)} prefetched message(s)",
                                   self._send(buffered, b"-NAK"))
        if self._ephemeral:
            await self._close_step("deleting the ephemeral consumer", self._transport._api(
                nc, f"CONSUMER.DELETE.{self._config.stream}.{self._consumer}", None))
        if not nc.is_closed:
            await self._close_step("flushing the connection", nc.flush(
                timeout=max(int(self._config.publish_timeout), 1)))

    async def _close_step(self, what: str, step: Coroutine[Any, Any, Any]) -> None:
        if self._nc.is_closed:  # the transport closed first: nothing can be sent
            step.close()
            log.debug("closing receiver %s: %s skipped, the connection is closed",
                      self._consumer, what)
            return
        try:
            await step
        except Exception as exc:
            log.warning("NATS consumer %s: %s failed while closing (%r); unacknowledged "
                        "messages are redelivered after ack_wait", self._consumer, what, exc)


class NatsTransport(Transport):
    """The JetStream transport; see the module docstring."""

    def __init__(self, config: NatsConfig | None = None, *, url: str | None = None) -> None:
        self.config = config or NatsConfig()
        self._shown = redact_url(url) if url else ",".join(self.config.servers)
        self.capabilities = Capabilities(
            ordered_per_key=False,
            durable_groups=True,
            replay=True,
            broker_dedupe=True,
            cross_process=True,
            max_payload_bytes=self.config.max_payload - HEADER_RESERVE,
        )
        self._nc: _Client | None = None
        self._lock = asyncio.Lock()
        self._receivers: weakref.WeakSet[NatsReceiver] = weakref.WeakSet()
        self._closed = False
        #: PubAcks awaited: reply token -> future of the PubAck's (body, status).
        self._pub_acks: dict[bytes, asyncio.Future[tuple[bytes, str | None]]] = {}
        self._pub_inbox = ""
        self._pub_serial = 0

    @classmethod
    def from_url(cls, url: str) -> NatsTransport:
        """Build from a ``nats://`` or ``tls://`` URL (see the module docstring)."""
        return cls(NatsConfig.from_url(url), url=url)

    # -- connection ----------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        config = self.config
        if not (config.tls or config.tls_ca or config.tls_cert):
            return None
        try:
            context = ssl.create_default_context(cafile=config.tls_ca)
            if config.tls_cert:
                context.load_cert_chain(config.tls_cert, config.tls_key)
        except OSError as exc:  # ssl.SSLError included; tls_key hidden as redact_url does
            files = ", ".join(f"{name}={'***' if name == 'tls_key' else repr(value)}"
                              for name, value in (("tls_ca", config.tls_ca),
                                                  ("tls_cert", config.tls_cert),
                                                  ("tls_key", config.tls_key)) if value)
            raise BackendConnectionError(
                f"NATS {self._shown}: cannot load the TLS files ({files}): "
                f"{getattr(exc, 'strerror', None) or exc}; give readable PEM files (tls_key "
                "unencrypted, matching tls_cert)") from exc
        return context

    def _credentials_hint(self) -> str:
        """What to check when the server refuses the connection's credentials."""
        config = self.config
        if config.creds is not None:
            return (f"check that the credentials file {config.creds!r} (option creds) holds "
                    "a user of an account this server trusts (operator, resolver) and that "
                    "its JWT has not expired")
        if config.user is not None:
            return (f"check the password of user {config.user!r} (nats://user:password@host) "
                    "against the server's authorization block")
        if config.token is not None:
            return ("check the token (nats://token@host or ?token=) against the server's "
                    "authorization block")
        return ("the server requires authentication: add user:password@ or token@ to the "
                "URL, or ?creds=/path/to/user.creds")

    async def _connect(self) -> _Client:
        if self._nc is not None and not self._nc.is_closed:
            return self._nc
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                return self._nc
            if self._closed:
                raise BackendConnectionError(f"the NATS transport {self._shown} is closed")
            config = self.config

            errors: list[Exception] = []
            refusals: list[Exception] = []
            connected = False  # read by on_error: refusals before it end the first connect
            refused = asyncio.Event()

            async def on_error(exc: Exception) -> None:
                errors[:] = [exc]
                if _auth_refused(exc):
                    if connected and not refusals:  # reconnecting: say it once
                        log.warning("NATS %s: the server refused the credentials while "
                                    "reconnecting (%s): %s", self._shown, exc,
                                    self._credentials_hint())
                    refusals[:] = [exc]
                    refused.set()
                log.debug("NATS %s: %r", self._shown, exc)

            async def on_disconnected() -> None:
                for receiver in list(self._receivers):
                    receiver.disconnected()
                if not self._closed:
                    log.warning("NATS %s: disconnected; reconnecting", self._shown)

            async def on_reconnected() -> None:
                log.warning("NATS %s: reconnected", self._shown)
                refusals.clear()
                for receiver in list(self._receivers):
                    receiver.reset()

            options: dict[str, Any] = {
                "servers": list(config.servers),
                "name": config.name,
                "connect_timeout": config.connect_timeout,
                "allow_reconnect": True,
                "max_reconnect_attempts": -1,
                "reconnect_time_wait": 0.5,
                "error_cb": on_error,
                "disconnected_cb": on_disconnected,
                "reconnected_cb": on_reconnected,
            }
            if config.user is not None:
                options["user"] = config.user
                options["password"] = config.password
            if config.token is not None:
                options["token"] = config.token
            if config.creds is not None:
                _check_creds(config.creds, self._shown)
                options["user_credentials"] = config.creds
            context = self._tls_context()
            if context is not None:
                options["tls"] = context
            # nats-py retries the first connect until our deadline, refused credentials
            # included: stop at the first refusal instead.
            connecting = asyncio.ensure_future(_open(options))
            watching = asyncio.ensure_future(refused.wait())
            try:
                await asyncio.wait((connecting, watching), timeout=config.connect_timeout * 2,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                watching.cancel()
                if not connecting.done():
                    connecting.cancel()
                    await asyncio.wait((connecting,))  # never raises the task's outcome
            if connecting.cancelled():
                if refusals:
                    raise BackendConnectionError(
                        f"NATS at {self._shown} refused the connection's credentials "
                        f"({refusals[-1]}): {self._credentials_hint()}") from refusals[-1]
                raise BackendConnectionError(
                    f"cannot connect to NATS at {self._shown} within "
                    f"{config.connect_timeout * 2:g} s"
                    + (f"; last error: {errors[-1]!r}" if errors else "")
                ) from (errors[-1] if errors else None)
            try:
                nc = connecting.result()
            except Exception as exc:
                raise BackendConnectionError(
                    f"cannot connect to NATS at {self._shown}: {exc!r}") from exc
            try:
                self._pub_inbox = nc.new_inbox()
                sub = await nc.subscribe(f"{self._pub_inbox}.*", cb=self._on_pub_ack)
                sid = getattr(sub, "_id", None)
                if isinstance(sid, int):
                    nc.set_direct(sid, self._on_pub_ack_raw)
                server_max = nc.max_payload
                if server_max < config.max_payload:
                    log.warning("NATS %s: the server's max_payload is %d bytes, smaller than "
                                "the configured %d; set ?max_payload=%d",
                                self._shown, server_max, config.max_payload, server_max)
                await self._ensure_stream(nc, config.stream, f"{config.prefix}.>",
                                          config.max_age)
                await self._ensure_stream(nc, config.dlq_stream, f"{config.dlq_prefix}.>", 0.0)
            except BaseException:
                await nc.close()
                raise
            connected = True
            self._nc = nc
            return nc

    async def _api(self, nc: NatsClient, subject: str, payload: dict[str, Any] | None,
                   timeout: float | None = None) -> dict[str, Any]:
        body = orjson.dumps(payload) if payload is not None else b""
        reply = await nc.request(f"$JS.API.{subject}", body,
                                 timeout=timeout or self.config.publish_timeout)
        data: dict[str, Any] = orjson.loads(reply.data)
        error = data.get("error")
        if error:
            raise _ApiError(int(error.get("code", 0)), int(error.get("err_code", 0)),
                            str(error.get("description", error)))
        return data

    async def _ensure_stream(self, nc: NatsClient, name: str, subjects: str,
                             max_age: float) -> None:
        try:
            info = await self._api(nc, f"STREAM.INFO.{name}", None)
        except _ApiError as exc:
            if exc.code != 404:
                raise
        else:
            existing = info.get("config", {}).get("subjects") or []
            if subjects not in existing:
                raise ConfigurationError(
                    f"NATS {self._shown}: stream {name!r} exists with subjects {existing}, "
                    f"not {subjects!r}; choose another stream or prefix")
            return
        config = self.config
        stream = {
            "name": name,
            "subjects": [subjects],
            "retention": "limits",
            "discard": "old",
            "storage": "file",
            "max_age": _ns(max_age),
            "num_replicas": config.replicas,
            "duplicate_window": _ns(min(config.duplicate_window, max_age)
                                    if max_age else config.duplicate_window),
            "max_msgs": -1,
            "max_bytes": -1,
            "max_msg_size": -1,
            "max_consumers": -1,
        }
        try:
            await self._api(nc, f"STREAM.CREATE.{name}", stream)
        except _ApiError as exc:
            try:  # created concurrently by another process?
                await self._api(nc, f"STREAM.INFO.{name}", None)
            except _ApiError:
                raise ConfigurationError(
                    f"NATS {self._shown}: cannot create stream {name!r} on {subjects!r}: "
                    f"{exc.description}") from exc

    # -- publishing ----------------------------------------------------------------------

    async def _publish(self, nc: NatsClient, subject: str, body: bytes,
                       headers: dict[str, str]) -> None:
        reply = await nc.request(subject, body, timeout=self.config.publish_timeout,
                                 headers=headers)
        data = orjson.loads(reply.data)
        error = data.get("error") if isinstance(data, dict) else None
        if error or not isinstance(data, dict) or "seq" not in data:
            raise _ApiError(int((error or {}).get("code", 0)), int((error or {}).get(
                "err_code", 0)), str((error or {}).get("description", data)))

    def _on_pub_ack_raw(self, subject: bytes, reply: bytes, data: bytes,
                        headers: bytes | None) -> None:
        """A PubAck, straight from the parser (see :class:`_Client`)."""
        future = self._pub_acks.pop(subject[subject.rfind(b".") + 1:], None)
        if future is not None and not future.done():
            status = headers[9:12].decode() if headers and headers[8:9] == b" " else None
            future.set_result((data, status))

    async def _on_pub_ack(self, msg: Msg) -> None:
        """The same through nats-py's callback (used only without the direct path)."""
        future = self._pub_acks.pop(msg.subject.rsplit(".", 1)[-1].encode(), None)
        if future is not None and not future.done():
            future.set_result((msg.data, msg.headers.get("Status") if msg.headers else None))

    async def _publish_window(self, nc: _Client, jobs: Sequence[tuple[str, bytes, str]]
                              ) -> list[BaseException]:
        """Publish ``jobs`` (subject, body, id) with their PubAcks awaited together; return
        the failures."""
        loop = asyncio.get_running_loop()
        acks = self._pub_acks
        inbox = self._pub_inbox
        futures: list[tuple[bytes, asyncio.Future[tuple[bytes, str | None]]]] = []
        items: list[tuple[str, str, bytes, str]] = []
        failures: list[BaseException] = []
        serial = self._pub_serial
        for subject, body, msg_id in jobs:
            serial += 1
            token = b"%d" % serial
            future: asyncio.Future[tuple[bytes, str | None]] = loop.create_future()
            acks[token] = future
            futures.append((token, future))
            items.append((subject, f"{inbox}.{serial}", body, msg_id))
        self._pub_serial = serial
        try:
            await nc.publish_with_ids(items)
            if futures:
                await asyncio.wait([f for _, f in futures], timeout=self.config.publish_timeout)
        except nats.errors.Error as exc:
            failures.append(exc)
        finally:
            for token, future in futures:
                if not future.done():
                    acks.pop(token, None)
                    future.cancel()
        for _token, future in futures:
            if future.cancelled():
                if not failures:
                    failures.append(nats.errors.TimeoutError())
                else:
                    failures.append(failures[0])
                continue
            body, status = future.result()
            if status == "503":
                failures.append(nats.errors.NoRespondersError())
                continue
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                failures.append(exc)
                continue
            error = data.get("error") if isinstance(data, dict) else None
            if error or not isinstance(data, dict) or "seq" not in data:
                error = error if isinstance(error, dict) else {}
                failures.append(_ApiError(int(error.get("code", 0)),
                                          int(error.get("err_code", 0)),
                                          str(error.get("description", data))))
        return failures

    def _publish_error(self, failed: int, total: int, exc: BaseException) -> PublishError:
        if isinstance(exc, nats.errors.NoRespondersError):
            why = (f"no JetStream stream answered (is stream {self.config.stream!r} on "
                   f"'{self.config.prefix}.>' gone, or JetStream disabled?)")
        elif isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError):
            why = (f"no PubAck within {self.config.publish_timeout:g} s (server down or "
                   "reconnecting?)")
        else:
            why = repr(exc)
        return PublishError(
            f"NATS {self._shown}: {failed} of {total} event(s) not accepted by stream "
            f"{self.config.stream!r}: {why}; publishing them again is safe (ids deduplicate "
            f"within {self.config.duplicate_window:g} s)")

    async def send(self, messages: Sequence[OutboundMessage]) -> None:
        if not messages:
            return
        try:
            nc = await self._connect()
        except Exception as exc:
            raise PublishError(f"publishing {len(messages)} event(s): {exc}") from exc
        prefix = self.config.prefix
        limit = min(self.config.max_payload, nc.max_payload)  # the server's INFO may be lower
        jobs = []
        for message in messages:
            body = message.body
            msg_id = message.id
            size = len(body) + len(msg_id) + 27
            if size > limit:
                raise PayloadTooLargeError(msg_id, len(body), limit - HEADER_RESERVE)
            jobs.append((f"{prefix}.{message.topic}", body, msg_id))
        failures: list[BaseException] = []
        for start in range(0, len(jobs), PUBLISH_WINDOW):
            failures.extend(await self._publish_window(nc, jobs[start : start + PUBLISH_WINDOW]))
        if failures:
            raise self._publish_error(len(failures), len(messages), failures[0]) from failures[0]

    # -- consuming -----------------------------------------------------------------------

    async def open_receiver(self, spec: ConsumerSpec) -> Receiver:
        try:
            nc = await self._connect()
        except Exception as exc:
            raise SubscribeError(f"subscribing to {spec.pattern.text!r}: {exc}") from exc
        config = self.config
        stream = config.stream
        consumer: dict[str, Any] = {
            "ack_policy": "explicit",
            "ack_wait": _ns(spec.ack_timeout),
            "max_deliver": -1,
            "filter_subject": f"{config.prefix}.{spec.pattern.text}",
            "max_ack_pending": max(10_000, spec.max_in_flight * 16),
            "max_waiting": 512,
            "replay_policy": "instant",
        }
        try:
            if spec.group is None:
                consumer["deliver_policy"] = "new"
                consumer["inactive_threshold"] = _ns(EPHEMERAL_INACTIVE)
                info = await self._api(nc, f"CONSUMER.CREATE.{stream}",
                                       {"stream_name": stream, "config": consumer})
                name = str(info["name"])
            else:
                name = consumer_name(spec.group, spec.pattern.text)
                try:
                    info = await self._api(nc, f"CONSUMER.INFO.{stream}.{name}", None)
                except _ApiError as exc:
                    if exc.code != 404:
                        raise
                    consumer["durable_name"] = name
                    consumer["deliver_policy"] = "all" if spec.start == "earliest" else "new"
                    try:
                        info = await self._api(nc, f"CONSUMER.DURABLE.CREATE.{stream}.{name}",
                                               {"stream_name": stream, "config": consumer})
                    except _ApiError:  # another member created it meanwhile
                        info = await self._api(nc, f"CONSUMER.INFO.{stream}.{name}", None)
        except (_ApiError, nats.errors.Error) as exc:
            raise SubscribeError(
                f"NATS {self._shown}: cannot create consumer for {spec.pattern.text!r} "
                f"(group {spec.group!r}) on stream {stream!r}: {exc}") from exc
        # The consumer as it is (an existing one keeps the config of its creator).
        found = info.get("config")
        actual: dict[str, Any] = found if isinstance(found, dict) else {}
        ack_wait = actual.get("ack_wait")
        max_batch = actual.get("max_batch")
        receiver = NatsReceiver(self, nc, name, ephemeral=spec.group is None,
                                ack_timeout=spec.ack_timeout,
                                prefetch=PREFETCH * spec.max_in_flight,
                                ack_wait=ack_wait / 1e9 if isinstance(ack_wait, int) else None,
                                max_batch=max_batch if isinstance(max_batch, int) else 0)
        await receiver.start()
        self._receivers.add(receiver)
        return receiver

    # -- dead letters --------------------------------------------------------------------

    def dead_letter_subject(self, group: str | None) -> str:
        """The subject holding the dead letters of ``group`` (``None``: ephemeral ones)."""
        token = "_ephemeral" if group is None else _safe_token(group)
        return f"{self.config.dlq_prefix}.{token}"

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        nc = await self._connect()
        for letter in letters:
            headers = {"Nats-Msg-Id": str(letter.id), GROUP_HEADER: letter.group or ""}
            await self._publish(nc, self.dead_letter_subject(letter.group),
                                letter.model_dump_json().encode(), headers)

    async def read_dead_letters(
        self, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        nc = await self._connect()
        subject = (f"{self.config.dlq_prefix}.>" if group is None
                   else self.dead_letter_subject(group))
        letters: list[DeadLetter] = []
        seq = 1
        while len(letters) < limit:
            try:
                data = await self._api(nc, f"STREAM.MSG.GET.{self.config.dlq_stream}",
                                       {"seq": seq, "next_by_subj": subject})
            except _ApiError as exc:
                if exc.code == 404:
                    break
                raise
            message = data["message"]
            seq = int(message["seq"]) + 1
            letter = DeadLetter.model_validate_json(base64.b64decode(message["data"]))
            if group is None or letter.group == group:
                letters.append(letter)
        return letters

    async def close(self) -> None:
        self._closed = True
        for receiver in list(self._receivers):  # not closed by a bus: send their acks
            with contextlib.suppress(Exception):
                await receiver.flush_acks()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    def __repr__(self) -> str:
        return f"<NatsTransport {self._shown} stream={self.config.stream!r}>"
