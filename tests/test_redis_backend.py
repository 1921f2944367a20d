"""Redis-specific tests of the Redis Streams bus: wire format, dead-letter stream, URLs,
reconnecting after a server restart, and a consumer process killed mid-stream.

Tests that talk to Redis use the shared server (``AGENTEVENTS_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``) under a unique key prefix that is deleted afterwards, or a
private ``redis-server`` on a free port that only they start and kill.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

redis = pytest.importorskip("redis")

from services import REDIS_URL, delete_prefix, probe_redis, require  # noqa: E402

from agentevents.backends.redis.transport import (  # noqa: E402
    DEFAULT_MAX_PAYLOAD_BYTES,
    RedisBusConfig,
    RedisReceiver,
    RedisTransport,
    _order,
    group_name,
)
from agentevents.conformance_tests.helpers import Collector  # noqa: E402
from agentevents.core.bus import Bus  # noqa: E402
from agentevents.core.codec import decode_event, encode_event  # noqa: E402
from agentevents.core.errors import ConfigurationError, PublishError  # noqa: E402
from agentevents.core.event import Event, new_event_id  # noqa: E402
from agentevents.core.patterns import compile_pattern  # noqa: E402
from agentevents.core.transport import (  # noqa: E402
    ConsumerSpec,
    InboundMessage,
    OutboundMessage,
    Receiver,
    StartPosition,
)
from agentevents.plugins.registry import create_bus  # noqa: E402

require("REDIS", REDIS_URL, probe_redis)


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"aetest-{uuid.uuid4().hex[:10]}"
    yield name
    delete_prefix(REDIS_URL, name)


@pytest.fixture
def url(prefix: str) -> str:
    return f"{REDIS_URL}?prefix={prefix}"


@pytest_asyncio.fixture
async def buses(url: str) -> AsyncIterator[list[Bus]]:
    opened: list[Bus] = []
    yield opened
    for bus in opened:
        await bus.close(timeout=5.0)


def _sync_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


# -- URLs ---------------------------------------------------------------------------------


class TestUrls:
    def test_defaults(self) -> None:
        config = RedisBusConfig.from_url("redis://localhost")
        assert (config.host, config.port, config.db, config.tls) == ("localhost", 6379, 0, False)
        assert config.prefix == "agentevents"
        assert config.maxlen is None
        assert config.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES

    def test_every_option(self) -> None:
        config = RedisBusConfig.from_url(
            "rediss://alice:s%40cret@redis.example:6380/3?prefix=app1&maxlen=1000"
            "&socket_timeout=2.5&max_payload_bytes=4096"
        )
        assert config.tls
        assert (config.host, config.port, config.db) == ("redis.example", 6380, 3)
        assert (config.username, config.password) == ("alice", "s@cret")
        assert (config.prefix, config.maxlen, config.socket_timeout) == ("app1", 1000, 2.5)
        assert config.max_payload_bytes == 4096
        assert config.stream_key("a.b") == "app1:stream:a.b"

    def test_password_never_shown(self) -> None:
        url = "redis://:hunter2@127.0.0.1:6379/0?prefix=x"
        transport = RedisTransport.from_url(url)
        assert "hunter2" not in repr(transport)
        assert "hunter2" not in repr(transport.config)
        assert "hunter2" not in repr(Bus(transport, url=url))
        with pytest.raises(ConfigurationError) as bad:
            RedisBusConfig.from_url("redis://:hunter2@127.0.0.1/0?colour=red")
        assert "hunter2" not in str(bad.value)
        assert "colour" in str(bad.value)

    @pytest.mark.parametrize(
        "url",
        [
            "redis://h/0?maxlen=0",
            "redis://h/0?maxlen=many",
            "redis://h/notadb",
            "redis://h:99999/0",
            "redis://h/0?socket_timeout=0",
            "redis://h/0?max_payload_bytes=0",
            "redis://h/0?prefix=a*b",
            "http://h/0",
        ],
    )
    def test_bad_values_are_configuration_errors(self, url: str) -> None:
        with pytest.raises(ConfigurationError):
            RedisBusConfig.from_url(url)

    def test_group_names_are_sanitised_and_depend_on_the_pattern(self) -> None:
        a = group_name("agent 7.handler", "code.>")
        assert " " not in a
        assert a != group_name("agent 7.handler", "task.>")
        assert a == group_name("agent 7.handler", "code.>")

    def test_plugin_creates_the_transport(self) -> None:
        bus = create_bus(f"{REDIS_URL}?prefix=unused")
        assert isinstance(bus.transport, RedisTransport)
        assert bus.capabilities.cross_process
        assert not bus.capabilities.ordered_per_key


# -- ordering across streams ------------------------------------------------------------------


class TestOrder:
    def test_millisecond_then_publish_time_then_sequence(self) -> None:
        assert _order(b"4-9", {b"pt": b"99"}) < _order(b"5-0", {b"pt": b"1"})
        # Within one millisecond ``pt`` decides, whatever the event ids (never compared).
        assert (_order(b"5-3", {b"pt": b"10", b"id": b"z"})
                < _order(b"5-0", {b"pt": b"11", b"id": b"a"}))
        assert _order(b"5-0", {b"pt": b"10"}) < _order(b"5-1", {b"pt": b"10"})
        assert _order(b"5-7", {b"pt": b"10"}) == (5, 10, 7)

    def test_entries_without_a_numeric_pt_order_first_in_their_millisecond(self) -> None:
        assert _order(b"5-7", {b"body": b"{}"}) == (5, 0, 7)
        assert _order(b"5-7", {b"pt": b"soon"}) == (5, 0, 7)
        assert _order(b"5-7", {b"pt": b"-3"}) == (5, 0, 7)
        assert _order(b"5-7", None) == (5, 0, 7)
        assert _order(b"5-7", {}) < _order(b"5-0", {b"pt": b"1"})

    def test_publish_times_strictly_increase_per_transport(self) -> None:
        transport = RedisTransport(RedisBusConfig())  # no connection is made
        stamps = [transport._stamp() for _ in range(1000)]
        assert stamps == sorted(set(stamps))  # strictly increasing
        assert abs(stamps[0] - time.time_ns() // 1000) < 60_000_000
        transport._last_pt = 10**18  # the clock went back: still above the last one
        assert transport._stamp() == 10**18 + 1


# -- what is stored in Redis ----------------------------------------------------------------


@pytest.mark.asyncio
class TestWireFormat:
    async def test_entries_are_flat_fields_any_client_can_read(
        self, url: str, prefix: str, buses: list[Bus]
    ) -> None:
        bus = create_bus(url)
        buses.append(bus)
        event = Event(type="order.placed", source="agent-1", key="order-9",
                      payload={"total": 12.5})
        await bus.publish(event)
        client = _sync_client()
        try:
            entries = client.xrange(f"{prefix}:stream:order.placed")
            assert client.smembers(f"{prefix}:types") == {b"order.placed"}
        finally:
            client.close()
        assert len(entries) == 1
        fields = {k.decode(): v for k, v in entries[0][1].items()}
        assert fields["id"].decode() == str(event.id)
        assert fields["type"] == b"order.placed"
        assert fields["key"] == b"order-9"
        assert fields["source"] == b"agent-1"
        assert fields["time"].decode() == event.time.isoformat()
        stamp = int(fields["pt"])  # publish time, microseconds
        assert abs(stamp - time.time_ns() // 1000) < 60_000_000
        document = orjson.loads(fields["body"])
        assert document["specversion"] == "1.0"
        assert decode_event(fields["body"]) == event

    async def test_text_is_sent_as_utf_8_and_bytes_as_they_are(
        self, url: str, prefix: str, buses: list[Bus]
    ) -> None:
        """The transport packs its own commands: non-ASCII keys and sources, and bodies
        holding protocol bytes (CR LF, ``$``, ``*``), arrive unchanged."""
        bus = create_bus(url)
        buses.append(bus)
        received = Collector("member")
        await bus.subscribe("text.>", received, group="texts")
        event = Event(type="text.sent", source="agent-é", key="clé-✓",
                      payload={"raw": "a\r\n$3\r\n*1\r\nb", "emoji": "🙂"})
        await bus.publish(event)
        await received.wait_for_events([event])
        client = _sync_client()
        try:
            ((_entry_id, fields),) = client.xrange(f"{prefix}:stream:text.sent")
        finally:
            client.close()
        assert fields[b"key"].decode() == "clé-✓"
        assert fields[b"source"].decode() == "agent-é"
        assert decode_event(fields[b"body"]) == event

    async def test_entries_of_other_clients_need_no_publish_time(
        self, url: str, prefix: str, buses: list[Bus]
    ) -> None:
        """An entry another client wrote with only ``body`` (no ``pt``) is delivered too."""
        bus = create_bus(url)
        buses.append(bus)
        ours = Event(type="ext.ours", payload={"n": 1})
        theirs = Event(type="ext.theirs", payload={"n": 2})
        await bus.publish(ours)
        client = _sync_client()
        try:
            client.sadd(f"{prefix}:types", "ext.theirs")
            client.xadd(f"{prefix}:stream:ext.theirs", {"body": encode_event(theirs)})
        finally:
            client.close()
        received = Collector("member")
        await bus.subscribe("ext.>", received, group="mixed", start="earliest")
        await received.wait_for_events([ours, theirs])

    async def test_maxlen_caps_each_stream(self, url: str, prefix: str,
                                           buses: list[Bus]) -> None:
        bus = create_bus(f"{url}&maxlen=100")
        buses.append(bus)
        for start in range(0, 1000, 100):
            await bus.publish_many([Event(type="log.line", payload={"n": n})
                                    for n in range(start, start + 100)])
        client = _sync_client()
        try:
            length = client.xlen(f"{prefix}:stream:log.line")
        finally:
            client.close()
        assert 100 <= length < 1000  # MAXLEN ~ trims whole radix-tree nodes

    async def test_a_closed_member_leaves_no_consumer_behind(
        self, url: str, prefix: str, buses: list[Bus]
    ) -> None:
        bus = create_bus(url)
        received = Collector("member")
        await bus.subscribe("visit.>", received, group="visitors", consumer="m1")
        event = Event(type="visit.made")
        await bus.publish(event)
        await received.wait_for_events([event])
        await bus.close()
        stream = f"{prefix}:stream:visit.made"
        client = _sync_client()
        try:
            (group,) = client.xinfo_groups(stream)
            consumers = client.xinfo_consumers(stream, group["name"])
        finally:
            client.close()
        assert group["pending"] == 0
        assert consumers == []

    async def test_dead_letter_stream_holds_flat_documented_fields(
        self, url: str, prefix: str, buses: list[Bus]
    ) -> None:
        bus = create_bus(url)
        buses.append(bus)
        failing = Collector("failing", fail=lambda event, attempt: True)
        await bus.subscribe("job.>", failing, group="workers", max_attempts=2,
                            retry_backoff=0.01)
        event = Event(type="job.run", payload={"n": 1})
        await bus.publish(event)
        letters: list[object] = []

        async def fetch() -> None:
            letters[:] = await bus.dead_letters("workers")

        deadline = time.monotonic() + 20
        while not letters and time.monotonic() < deadline:
            await fetch()
            await asyncio.sleep(0.05)
        assert letters
        assert await bus.dead_letters("someone-else") == []
        client = _sync_client()
        try:
            entries = client.xrange(f"{prefix}:deadletter")
        finally:
            client.close()
        assert len(entries) == 1
        fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
        assert fields["group"] == "workers"
        assert fields["pattern"] == "job.>"
        assert fields["topic"] == "job.run"
        assert fields["event_id"] == str(event.id)
        assert fields["event_type"] == "job.run"
        assert fields["attempts"] == "2"
        assert fields["error_type"] == "HandlerFailure"
        assert fields["body_base64"] == "false"
        assert decode_event(fields["body"].encode()) == event


# -- a private server that the test kills and restarts -----------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


def _kill(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGKILL)
        server.wait(10)


needs_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                  reason="redis-server binary not installed")


@needs_server
@pytest.mark.asyncio
async def test_publish_fails_clearly_while_down_and_recovers_after_restart() -> None:
    port = _free_port()
    server = _start_server(port)
    url = f"redis://:topsecret@127.0.0.1:{port}/0?prefix=rc&socket_timeout=1"
    bus = None
    try:
        # The private server has no password; redis-py only sends AUTH when one is given,
        # so point the bus at it without one and check redaction on a second transport.
        bus = create_bus(f"redis://127.0.0.1:{port}/0?prefix=rc&socket_timeout=1")
        received = Collector("subscriber")
        await bus.subscribe("svc.>", received, group="g", ack_timeout=2.0)
        first = Event(type="svc.up")
        await bus.publish(first)
        await received.wait_for_events([first])

        _kill(server)
        with pytest.raises(PublishError) as failed:
            await bus.publish(Event(type="svc.lost"))
        message = str(failed.value)
        assert f"127.0.0.1:{port}" in message
        assert "publishing" in message

        secret = RedisTransport.from_url(url)
        try:
            with pytest.raises(PublishError) as failed_secret:
                await Bus(secret, url=url).publish(Event(type="svc.lost"))
            assert "topsecret" not in str(failed_secret.value)
        finally:
            await secret.close()

        server = _start_server(port)  # empty again: --save '' --appendonly no
        again = Event(type="svc.back")
        await bus.publish(again)  # reconnects on its own
        await received.wait_for_events([again])  # the subscriber re-creates its group
    finally:
        if bus is not None:
            await bus.close(timeout=5.0)
        _kill(server)


# -- a consumer process killed in the middle ---------------------------------------------------

ROOT = str(Path(__file__).resolve().parents[1])

_CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from agentevents.plugins.registry import create_bus

    url, done_key = sys.argv[1], sys.argv[2]

    async def main() -> None:
        client = aioredis.Redis.from_url(url.split("?")[0])
        bus = create_bus(url)

        async def handle(event) -> None:
            await client.sadd(done_key, str(event.id))
            await client.incr(done_key + ":calls")

        await bus.subscribe("fault.>", handle, group="fault-workers", ack_timeout=2.0,
                            max_in_flight=64)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.asyncio
async def test_consumer_process_killed_mid_stream_loses_nothing(
    url: str, prefix: str, tmp_path: Path, buses: list[Bus]
) -> None:
    total = 10_000
    script = tmp_path / "consumer.py"
    script.write_text(_CONSUMER)
    done_key = f"{prefix}:handled"
    env = {**os.environ, "PYTHONPATH": ROOT}

    def spawn() -> subprocess.Popen[str]:
        process = subprocess.Popen([sys.executable, str(script), url, done_key],
                                   stdout=subprocess.PIPE, text=True, env=env)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        return process

    publisher = create_bus(url)
    buses.append(publisher)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    consumer = spawn()
    try:
        events = [Event(type=f"fault.kind{n % 4}", payload={"n": n}) for n in range(total)]
        for start in range(0, total, 500):
            await publisher.publish_many(events[start : start + 500])

        async def handled() -> int:
            return int(await client.scard(done_key))

        deadline = time.monotonic() + 60
        while await handled() < total // 3 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.01)
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(10)
        at_kill = await handled()
        assert 0 < at_kill < total, f"kill came too late to test anything ({at_kill})"

        consumer = spawn()
        deadline = time.monotonic() + 90
        while await handled() < total and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.1)
        got = await client.smembers(done_key)
        missing = {str(e.id) for e in events} - {m.decode() for m in got}
        assert not missing, f"{len(missing)} event(s) never handled (killed at {at_kill})"
        calls = int(await client.get(done_key + ":calls") or 0)
        assert calls >= total
    finally:
        _kill_process(consumer)
        await client.aclose()


def _kill_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


@pytest.mark.asyncio
async def test_lone_member_keeps_key_order_across_streams_with_a_backlog(
    url: str, buses: list[Bus]
) -> None:
    """A key's events spread over several types (streams), read from a backlog with a
    small ``max_in_flight``: Redis' per-stream COUNT must not reorder them."""
    publisher = create_bus(url)
    buses.append(publisher)
    keys = [f"k{n}" for n in range(4)]
    rng = random.Random(7)  # uneven streams: one key's neighbours land anywhere
    events = [Event(type=f"mix.kind{rng.choice('aaaabbc')}", key=key, payload={"n": n})
              for n in range(60) for key in keys]
    for start in range(0, len(events), 25):
        await publisher.publish_many(events[start : start + 25])
    order: dict[str, list[int]] = {}

    async def handler(event: Event) -> None:
        assert event.key is not None
        await asyncio.sleep(0.001)
        order.setdefault(event.key, []).append(int(event.payload["n"]))

    consumer = create_bus(url)
    buses.append(consumer)
    await consumer.subscribe("mix.>", handler, group="mixers", start="earliest",
                             max_in_flight=3)
    deadline = time.monotonic() + 30
    while sum(map(len, order.values())) < len(events) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    for key in keys:
        assert order.get(key) == list(range(60)), f"key {key} out of order: {order.get(key)}"


@pytest.mark.asyncio
@pytest.mark.parametrize("group", ["relayed", None])
async def test_lone_member_keeps_publish_order_when_ids_are_older_than_publishing(
    url: str, prefix: str, buses: list[Bus], group: str | None
) -> None:
    """Events minted long before they are published (an outbox relay publishes ids minted
    earlier, by several writers): the merge of several streams must follow publish order,
    not event-id order. Each batch is ``L`` (type a, another key, minted last), then one
    key's ``X`` (type a, v1) and ``Y`` (type b, v2): ``L``'s id is above both, ``X`` and
    ``Y`` share a key but not a stream."""
    batches = 8
    publish_order: list[str] = []
    planned: list[list[Event]] = []
    for n in range(batches):
        x, y, last = new_event_id(), new_event_id(), new_event_id()  # x < y < last
        batch = [
            Event(id=last, type="relay.a", source="s", key=f"other{n}", payload={"name": f"L{n}"}),
            Event(id=x, type="relay.a", source="s", key=f"k{n}", payload={"name": f"X{n}"}),
            Event(id=y, type="relay.b", source="s", key=f"k{n}", payload={"name": f"Y{n}"}),
        ]
        planned.append(batch)
        publish_order += [str(e.payload["name"]) for e in batch]
    got: list[str] = []

    async def handler(event: Event) -> None:
        got.append(str(event.payload.get("name", "")))

    publisher = create_bus(url)
    buses.append(publisher)
    consumer = create_bus(url)
    buses.append(consumer)
    if group is None:  # ephemeral: receives what is published after it subscribed
        await consumer.subscribe("relay.>", handler, max_in_flight=1)
        # Both streams must exist before the subscriber's first read of them.
        await publisher.publish_many([Event(type="relay.a"), Event(type="relay.b")])
        await asyncio.sleep(0.5)
        got.clear()
    for batch in planned:  # a backlog for the group member: one read sees several batches
        await publisher.publish_many(batch)
    if group is not None:
        await consumer.subscribe("relay.>", handler, group=group, start="earliest",
                                 max_in_flight=1)
    deadline = time.monotonic() + 20
    # (A warm-up event arriving after the clear has no name: it is not counted.)
    while (sum(1 for name in got if name) < len(publish_order)  # noqa: ASYNC110
           and time.monotonic() < deadline):
        await asyncio.sleep(0.02)
    got = [name for name in got if name]
    for n in range(batches):
        mine = [name for name in got if name in (f"X{n}", f"Y{n}")]
        assert mine == [f"X{n}", f"Y{n}"], f"key k{n} out of order: {got}"
    assert got == publish_order

    # The test is only meaningful if some batches tied across streams: Y in the same Redis
    # millisecond as L (pipelined XADDs nearly always are).
    client = _sync_client()
    try:
        millis = {entry[1][b"id"].decode(): int(entry[0].split(b"-")[0])
                  for stream in ("relay.a", "relay.b")
                  for entry in client.xrange(f"{prefix}:stream:{stream}")}
    finally:
        client.close()
    assert any(millis[str(batch[0].id)] == millis[str(batch[2].id)] for batch in planned)


# -- the merge of several streams by one member: what may be handed out when ----------------
#
# These drive one receiver directly, so that every read and every publish happens at a
# known moment: the merge must hand out an entry only when no stream can still hold an
# older one (see "Receiving" in the transport's docstring).


def _spec(pattern: str, group: str | None, start: StartPosition = "latest") -> ConsumerSpec:
    return ConsumerSpec(pattern=compile_pattern(pattern), group=group, start=start,
                        ack_timeout=30.0, consumer="m1", max_in_flight=2, max_attempts=5)


async def _send(transport: RedisTransport, *items: tuple[str, str, str | None]) -> None:
    """Publish ``(name, type, key)`` raw messages, in one pipeline, body = name."""
    await transport.send([OutboundMessage(name, topic, key, body=name.encode())
                          for name, topic, key in items])


async def _drain(receiver: Receiver, total: int, limit: int = 2) -> list[str]:
    """Bodies of what ``receiver`` hands out, ``limit`` at most per call, acked."""
    got: list[str] = []
    deadline = time.monotonic() + 10
    while len(got) < total and time.monotonic() < deadline:
        batch = await receiver.receive(limit, 0.2)
        assert len(batch) <= limit
        got += [bytes(m.body or b"").decode() for m in batch]
        await receiver.ack(batch)
    return got


@pytest.mark.asyncio
@pytest.mark.parametrize("group", ["merging", None])
async def test_reading_on_full_streams_does_not_pass_entries_of_the_others(
    url: str, group: str | None
) -> None:
    """The regression behind the outbox fault test's v13-before-v12.

    A read with COUNT 2 gets a1 a2 (stream a, full) and b1 (stream b), hands out a1 a2 and
    keeps b1: stream a may hold entries older than b1. Then the publisher sends X (type b)
    and Y (type a) of one key. The receiver used to read on *only the full stream a*,
    found Y and nothing else there, and took that as "complete": it handed out b1 and Y
    while X, older, still sat unread in stream b. A read that continues must read every
    stream, since any of them may have grown since the previous read.
    """
    publisher, consumer = RedisTransport.from_url(url), RedisTransport.from_url(url)
    try:
        await _send(publisher, ("w1", "merge.a", None), ("w2", "merge.b", None))
        receiver = await consumer.open_receiver(_spec("merge.>", group))
        await _send(publisher, ("a1", "merge.a", None), ("a2", "merge.a", None),
                    ("b1", "merge.b", None))
        # Usually one receive returns a1 a2. Should a2 fall in a later millisecond than a1,
        # a2 is not complete after the first read (stream a was full), so it takes two.
        first: list[InboundMessage] = []
        for _ in range(5):
            first += await receiver.receive(2 - len(first), 1.0)
            if len(first) == 2:
                break
        assert [bytes(m.body or b"").decode() for m in first] == ["a1", "a2"]
        await receiver.ack(first)
        await _send(publisher, ("X", "merge.b", "k"))
        await _send(publisher, ("Y", "merge.a", "k"))
        assert await _drain(receiver, 3) == ["b1", "X", "Y"]
        await receiver.close()
    finally:
        await publisher.close()
        await consumer.close()


@pytest.mark.asyncio
async def test_a_full_stream_bounds_the_merge_by_its_millisecond_not_its_stamp(
    url: str, prefix: str
) -> None:
    """Entries of one Redis millisecond are ordered by ``pt``, which is each publisher's
    own clock: a later entry of a stream may carry a smaller ``pt`` than an earlier one.

    Stream s holds L0 L1 (publisher Q, pt 800 and 900), then s1 (publisher P, pt 100);
    stream a holds a1 (P, pt 200, published after s1, same key). A read with COUNT 2 stops
    stream s at L1. The receiver used to take L1's whole order as the bound and hand out
    a1 (pt 200 < 900) before s1 was even read. What a full stream has not returned yet may
    be anything from the millisecond of its last entry on, so only entries of earlier
    milliseconds are complete.
    """
    client = _sync_client()
    try:
        client.sadd(f"{prefix}:types", "skew.s", "skew.a")
        for entry_id, pt, name in (("5000-0", 800, "L0"), ("5000-1", 900, "L1"),
                                   ("5000-2", 100, "s1")):
            client.xadd(f"{prefix}:stream:skew.s", {"pt": pt, "body": name}, id=entry_id)
        client.xadd(f"{prefix}:stream:skew.a", {"pt": 200, "body": "a1"}, id="5000-0")
    finally:
        client.close()
    consumer = RedisTransport.from_url(url)
    try:
        receiver = await consumer.open_receiver(_spec("skew.>", "skewed", "earliest"))
        assert await _drain(receiver, 4) == ["s1", "a1", "L0", "L1"]
        await receiver.close()
    finally:
        await consumer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("group", ["discovering", None])
async def test_an_entry_waits_for_a_stream_created_before_it_was_read(
    url: str, group: str | None
) -> None:
    """X goes to a brand-new stream (its type registered first), then Y of the same key
    to a known one. A read that finds Y must not hand it out before the receiver has
    looked at the stream that appeared meanwhile: every read checks the type registry.
    (The receiver used to re-read the registry only every 0.25 s, and handed out Y
    first.)"""
    publisher, consumer = RedisTransport.from_url(url), RedisTransport.from_url(url)
    try:
        await _send(publisher, ("w1", "found.a", None))
        receiver = await consumer.open_receiver(_spec("found.>", group))
        await _send(publisher, ("X", "found.b", "k"))
        await _send(publisher, ("Y", "found.a", "k"))
        assert await _drain(receiver, 2) == ["X", "Y"]
        await receiver.close()
    finally:
        await publisher.close()
        await consumer.close()


# -- failures of a round trip: nothing is sent twice that must not be ----------------------


def _lose_reply_of_first_group_read(receiver: Receiver, how: str) -> list[int]:
    """Make ``receiver``'s first ``XREADGROUP ... >`` run on the server and then fail
    (reply lost, timed out, or the caller cancelled) before its reply is read."""
    line = receiver._reads  # type: ignore[attr-defined]
    real_send = line._send
    lost: list[int] = []

    async def lossy(data: bytes, replies: int, timeout: float) -> list[object]:
        if not lost and b"XREADGROUP" in data and b"\r\n>\r\n" in data:
            lost.append(1)
            await real_send(data, replies, timeout)  # the server ran it ...
            if how == "cancelled":
                await asyncio.Event().wait()  # ... and the caller is cancelled
            if how == "timeout":
                raise TimeoutError
            raise redis.exceptions.ConnectionError("connection lost")  # ... reply lost
        return await real_send(data, replies, timeout)

    line._send = lossy
    return lost


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["lost", "timeout", "cancelled"])
async def test_a_group_read_whose_reply_was_lost_is_not_resent_blindly(
    url: str, prefix: str, how: str
) -> None:
    """A group read the server ran gave its entries to this member even if the reply never
    arrived. Sending ``>`` again would hand out the entries after them first (and leave
    these pending until XAUTOCLAIM): the next read must get them back first."""
    client = _sync_client()
    try:
        client.sadd(f"{prefix}:types", "lost.a", "lost.b")
        for n in range(1, 5):
            client.xadd(f"{prefix}:stream:lost.a", {"pt": 1, "body": f"a{n}"}, id=f"{n}000-0")
            client.xadd(f"{prefix}:stream:lost.b", {"pt": 1, "body": f"b{n}"}, id=f"{n}000-1")
    finally:
        client.close()
    consumer = RedisTransport.from_url(url)
    try:
        receiver = await consumer.open_receiver(_spec("lost.>", "lossy", "earliest"))
        lost = _lose_reply_of_first_group_read(receiver, how)
        if how == "cancelled":
            task = asyncio.ensure_future(receiver.receive(2, 1.0))
            while not lost:  # noqa: ASYNC110 - waits for the read to be sent
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(Exception, match="receiving"):
                await receiver.receive(2, 1.0)
        assert lost
        assert await _drain(receiver, 8) == ["a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
        await receiver.close()
    finally:
        await consumer.close()


@pytest.mark.asyncio
async def test_a_publish_pipeline_is_not_resent_after_the_server_may_have_run_it(
    url: str, prefix: str
) -> None:
    transport = RedisTransport.from_url(url)
    try:
        await _send(transport, ("w", "pub.a", None))
        line = transport._line
        real_send = line._send

        async def lossy(data: bytes, replies: int, timeout: float) -> list[object]:
            await real_send(data, replies, timeout)
            raise redis.exceptions.ConnectionError("connection lost")

        line._send = lossy  # type: ignore[method-assign]
        with pytest.raises(PublishError):
            await _send(transport, ("once", "pub.a", None))
        line._send = real_send  # type: ignore[method-assign]
    finally:
        await transport.close()
    client = _sync_client()
    try:
        bodies = [f[b"body"] for _id, f in client.xrange(f"{prefix}:stream:pub.a")]
    finally:
        client.close()
    assert bodies == [b"w", b"once"]  # ran once (the caller may publish it again)


@pytest.mark.asyncio
async def test_the_merge_buffer_stays_small_with_a_dense_and_a_steady_stream(
    url: str, prefix: str
) -> None:
    """A dense backlog (many entries per millisecond range) and a steady stream of later
    milliseconds: reading the steady stream on while the dense one is far behind only
    piles its entries up in the buffer (and the pending list); it is not read until the
    horizon reaches its last entry."""
    client = _sync_client()
    try:
        client.sadd(f"{prefix}:types", "dense.d", "dense.s")
        pipe = client.pipeline(transaction=False)
        for n in range(300):
            pipe.xadd(f"{prefix}:stream:dense.d", {"pt": 1, "body": f"d{n}"}, id=f"{1000 + n}-0")
            pipe.xadd(f"{prefix}:stream:dense.s", {"pt": 1, "body": f"s{n}"}, id=f"{5000 + n}-0")
        pipe.execute()
    finally:
        client.close()
    consumer = RedisTransport.from_url(url)
    try:
        receiver = await consumer.open_receiver(_spec("dense.>", "bounded", "earliest"))
        assert isinstance(receiver, RedisReceiver)
        got: list[str] = []
        largest = 0
        deadline = time.monotonic() + 20
        while len(got) < 600 and time.monotonic() < deadline:
            batch = await receiver.receive(2, 0.2)
            largest = max(largest, len(receiver._buffer))
            got += [bytes(m.body or b"").decode() for m in batch]
            await receiver.ack(batch)
        assert got == [f"d{n}" for n in range(300)] + [f"s{n}" for n in range(300)]
        assert largest <= 6, f"the buffer grew to {largest} entries"
        await receiver.close()
    finally:
        await consumer.close()


@pytest.mark.asyncio
async def test_a_round_trip_deadline_scales_with_its_size(url: str) -> None:
    transport = RedisTransport.from_url(f"{url}&socket_timeout=1")
    try:
        line = transport._line
        real_send = line._send
        deadlines: list[float] = []

        async def spy(data: bytes, replies: int, timeout: float) -> list[object]:
            deadlines.append(timeout)
            return await real_send(data, replies, timeout)

        line._send = spy  # type: ignore[method-assign]
        await line.run([("PING",)])
        await line.run([("ECHO", b"x" * (3 << 20))])
        await line.run([("PING",)], expect=4 << 20)
        assert deadlines[0] == pytest.approx(1.0, abs=0.01)
        assert deadlines[1] >= 4.0
        assert deadlines[2] >= 5.0
    finally:
        await transport.close()


@needs_server
@pytest.mark.asyncio
async def test_types_are_registered_again_after_the_server_restarted_empty() -> None:
    port = _free_port()
    server = _start_server(port)
    transport = RedisTransport.from_url(f"redis://127.0.0.1:{port}/0?prefix=rt&socket_timeout=1")
    try:
        await _send(transport, ("one", "again.t", None))
        _kill(server)
        server = _start_server(port)  # empty: --save '' --appendonly no
        await asyncio.sleep(0.2)  # (time passes: the closed connection is seen)
        await _send(transport, ("two", "again.t", None))
        check = redis.Redis(port=port)
        try:
            assert check.smembers("rt:types") == {b"again.t"}
        finally:
            check.close()
    finally:
        await transport.close()
        _kill(server)


@pytest.mark.asyncio
async def test_recovering_a_lost_read_skips_entries_it_claimed_meanwhile(
    url: str, prefix: str
) -> None:
    """Entries this member claimed from another (XAUTOCLAIM) may lie above the last id it
    read of their stream: the recovery read after a lost read must not hand them out
    again."""
    client = _sync_client()
    consumer = RedisTransport.from_url(url)
    try:
        client.sadd(f"{prefix}:types", "claim.a")
        key = f"{prefix}:stream:claim.a"
        for n in range(1, 5):
            client.xadd(key, {"pt": 1, "body": f"e{n}"}, id=f"{n}000-0")
        spec = ConsumerSpec(pattern=compile_pattern("claim.>"), group="claiming",
                            start="earliest", ack_timeout=1.0, consumer="m1",
                            max_in_flight=2, max_attempts=5)
        receiver = await consumer.open_receiver(spec)
        assert isinstance(receiver, RedisReceiver)
        client.xreadgroup(receiver.group, "m2", {key: ">"}, count=2)  # m2 takes e1 e2, dies
        # Past ack_timeout, so m1 claims them; short enough that the claimed e1 e2 do not
        # fall due again (1 s idle) before the two reads below.
        await asyncio.sleep(1.1)
        lost = _lose_reply_of_first_group_read(receiver, "lost")
        claimed = await receiver.receive(2, 1.0)  # XAUTOCLAIM: e1 e2 are this member's now
        assert [bytes(m.body or b"").decode() for m in claimed] == ["e1", "e2"]
        with pytest.raises(Exception, match="receiving"):
            await receiver.receive(2, 1.0)  # the read of e3 e4 ran, its reply was lost
        assert lost
        rest = await receiver.receive(2, 1.0)
        assert [bytes(m.body or b"").decode() for m in rest] == ["e3", "e4"]
        await receiver.ack([*claimed, *rest])
        await receiver.close()
    finally:
        client.close()
        await consumer.close()
