"""NATS-specific tests: URL parsing, subjects and stream/consumer config, broker dedupe,
the dead-letter stream, a server restart, and a consumer process killed mid-stream.

Uses the shared server of ``AGENTEVENTS_NATS_URL`` (default ``nats://127.0.0.1:4222``) with
streams unique to this session (deleted at the end); the restart test starts its own
``nats-server`` on a free port and kills only that one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats.errors as nats_errors
import orjson
import pytest
import pytest_asyncio
from nats_servers import NATS_SERVER, self_signed_certificate
from nats_servers import Server as _Server
from nats_servers import free_port as _free_port
from nats_servers import until as _until
from services import NATS_URL, probe_nats, require

from agentevents.backends.nats.transport import (
    HEADER_RESERVE,
    PUBLISH_CHUNK,
    NatsConfig,
    NatsReceiver,
    NatsTransport,
    _ApiError,
    _Client,
    consumer_name,
)
from agentevents.core.bus import Bus
from agentevents.core.deadletter import DeadLetter
from agentevents.core.errors import ConfigurationError, PublishError
from agentevents.core.event import Event
from agentevents.core.patterns import compile_pattern
from agentevents.core.transport import ConsumerSpec, InboundMessage, OutboundMessage
from agentevents.plugins.registry import create_bus

require("NATS", NATS_URL, probe_nats)

_SESSION = uuid.uuid4().hex[:10]
STREAM = f"NB_{_SESSION}"
PREFIX = f"nb{_SESSION}"
URL = f"{NATS_URL}?stream={STREAM}&prefix={PREFIX}&max_age=1h&duplicate_window=90s"


async def _delete_streams(url: str, *names: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in names:
            with contextlib.suppress(Exception):  # never created: nothing to delete
                await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    asyncio.run(_delete_streams(NATS_URL, STREAM, f"{STREAM}_DLQ", f"{STREAM}_FAULT",
                                f"{STREAM}_FAULT_DLQ"))


@pytest_asyncio.fixture
async def buses() -> AsyncIterator[list[Bus]]:
    opened: list[Bus] = []
    yield opened
    for bus in opened:
        await bus.close(timeout=5.0)


def _spec(u: str, *, ephemeral: bool = False, ack_timeout: float = 30.0,
          max_in_flight: int = 4) -> ConsumerSpec:
    """The spec of member "m" on ``<u>.>``, in group ``<u>-g`` (or ephemeral), from
    "latest", with 3 attempts."""
    return ConsumerSpec(compile_pattern(f"{u}.>"), None if ephemeral else f"{u}-g", "latest",
                        ack_timeout, "m", max_in_flight, 3)


async def _create_consumer(bus: Bus, name: str, pattern: str, *, ack_wait: float,
                           max_batch: int) -> None:
    """A durable consumer created by "someone else", with limits of its own."""
    await _api(bus, f"CONSUMER.DURABLE.CREATE.{STREAM}.{name}", {
        "stream_name": STREAM, "config": {
            "durable_name": name, "ack_policy": "explicit", "ack_wait": int(ack_wait * 1e9),
            "filter_subject": f"{PREFIX}.{pattern}", "deliver_policy": "all",
            "max_batch": max_batch, "max_deliver": -1}})


def _bus(opened: list[Bus], url: str = URL) -> Bus:
    bus = create_bus(url)
    opened.append(bus)
    return bus


async def _api(bus: Bus, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    transport = bus.transport
    assert isinstance(transport, NatsTransport)
    nc = await transport._connect()
    return await transport._api(nc, subject, payload)


def _unique() -> str:
    return "t" + uuid.uuid4().hex[:10]


# -- configuration ------------------------------------------------------------------------


class TestUrl:
    def test_defaults(self) -> None:
        config = NatsConfig.from_url("nats://")
        assert config.servers == ("nats://127.0.0.1:4222",)
        assert (config.stream, config.prefix) == ("AGENTEVENTS", "agentevents")
        assert config.max_age == 7 * 86400
        assert config.duplicate_window == 120
        assert config.replicas == 1
        assert config.dlq_stream == "AGENTEVENTS_DLQ"
        assert config.dlq_prefix == "agentevents_dlq"

    def test_credentials_hosts_and_options(self) -> None:
        config = NatsConfig.from_url(
            "nats://alice:s%40cret@n1:4223,n2?stream=ORDERS&prefix=acme.events&max_age=2h"
            "&replicas=3&duplicate_window=5m&max_payload=8388608&publish_timeout=1.5"
            "&creds=/etc/nats/app.creds"
        )
        assert config.servers == ("nats://n1:4223", "nats://n2:4222")
        assert (config.user, config.password, config.token) == ("alice", "s@cret", None)
        assert (config.stream, config.prefix) == ("ORDERS", "acme.events")
        assert (config.max_age, config.replicas, config.duplicate_window) == (7200, 3, 300)
        assert config.max_payload == 8388608
        assert config.publish_timeout == 1.5
        assert config.creds == "/etc/nats/app.creds"
        transport = NatsTransport(config)
        assert transport.capabilities.max_payload_bytes == 8388608 - HEADER_RESERVE

    def test_token_and_tls(self) -> None:
        config = NatsConfig.from_url("tls://s3cr3t@nats.example.com?tls_ca=/ca.pem")
        assert config.token == "s3cr3t"
        assert config.user is None
        assert config.tls
        assert config.servers == ("tls://nats.example.com:4222",)
        assert config.tls_ca == "/ca.pem"

    @pytest.mark.parametrize(
        ("url", "words"),
        [
            ("nats://h?stream=has.dot", "stream"),
            ("nats://h?prefix=a.*", "prefix"),
            ("nats://h?max_age=soon", "duration"),
            ("nats://h?replicas=0", "replicas"),
            ("nats://h?bogus=1", "unknown option"),
            ("http://h", "scheme"),
        ],
    )
    def test_bad_urls_are_configuration_errors(self, url: str, words: str) -> None:
        with pytest.raises(ConfigurationError, match=words):
            NatsConfig.from_url(url)

    def test_secrets_are_redacted(self) -> None:
        with pytest.raises(ConfigurationError) as error:
            NatsConfig.from_url("nats://alice:hunter2@h?bogus=1")
        assert "hunter2" not in str(error.value)
        assert "alice:***" in str(error.value)
        assert "hunter2" not in repr(NatsTransport.from_url("nats://alice:hunter2@h"))
        assert "tok123" not in repr(NatsTransport.from_url("nats://tok123@h"))

    @pytest.mark.asyncio
    async def test_unreachable_server_is_a_publish_error_without_secrets(self) -> None:
        bus = create_bus(f"nats://alice:hunter2@127.0.0.1:{_free_port()}?connect_timeout=0.5")
        try:
            with pytest.raises(PublishError) as error:
                await bus.publish(Event(type="a.b"))
            assert "hunter2" not in str(error.value)
            assert "cannot connect" in str(error.value)
        finally:
            await bus.close()

    def test_plugin_import_is_cheap_and_registered(self) -> None:
        code = ("import sys, agentevents.backends.nats as p; "
                "[info] = p.agentevents_bus_backends(); "
                "assert info.schemes == ('nats', 'tls') and info.extra == 'nats', info; "
                "assert not [m for m in sys.modules if m == 'nats' or m.startswith('nats.')]")
        subprocess.run([sys.executable, "-c", code], check=True)
        from agentevents.plugins.registry import create_bus as make

        assert isinstance(make("nats://127.0.0.1:1").transport, NatsTransport)

    def test_delivery_count_comes_from_the_ack_subject(self) -> None:
        from agentevents.backends.nats.transport import _delivery_count

        assert _delivery_count(b"$JS.ACK.S.C.3.10.12.1700000000000000000.0") == 3
        assert _delivery_count(b"$JS.ACK.dom.acchash.S.C.2.10.12.1700000000000000000.0.tok") == 2
        assert _delivery_count(b"$JS.ACK.garbage") == 1

    def test_consumer_names_are_valid_and_distinct(self) -> None:
        names = {
            consumer_name("agent-1.handle", "code.>"),
            consumer_name("agent-1.handle", "code.*"),
            consumer_name("agent-1_handle", "code.>"),
            consumer_name("agent 1.handle", "code.>"),
            consumer_name("..", "x"),
        }
        assert len(names) == 5
        for name in names:
            assert not set(name) & set(". *>"), name
        assert consumer_name("g", "p") == consumer_name("g", "p")


# -- subjects, streams and consumers -------------------------------------------------------


@pytest.mark.asyncio
class TestServerObjects:
    async def test_stream_config_and_subject_mapping(self, buses: list[Bus]) -> None:
        import nats

        bus = _bus(buses)
        u = _unique()
        seen: list[str] = []
        raw = await nats.connect(NATS_URL)
        try:
            async def on(msg: Any) -> None:
                seen.append(msg.subject)

            await raw.subscribe(f"{PREFIX}.{u}.>", cb=on)
            await raw.flush()
            await bus.publish(Event(type=f"{u}.code.build.failed"))
            await _until(lambda: bool(seen), what="the raw NATS subscriber")
        finally:
            await raw.close()
        assert seen == [f"{PREFIX}.{u}.code.build.failed"]
        info = await _api(bus, f"STREAM.INFO.{STREAM}")
        config = info["config"]
        assert config["subjects"] == [f"{PREFIX}.>"]
        assert config["retention"] == "limits"
        assert config["storage"] == "file"
        assert config["max_age"] == 3600 * 10**9
        assert config["duplicate_window"] == 90 * 10**9
        assert config["num_replicas"] == 1
        dlq = await _api(bus, f"STREAM.INFO.{STREAM}_DLQ")
        assert dlq["config"]["subjects"] == [f"{PREFIX}_dlq.>"]
        # Building a second transport on an existing stream is idempotent.
        await _bus(buses).publish(Event(type=f"{u}.again"))

    async def test_existing_stream_with_other_subjects_is_refused(
        self, buses: list[Bus]
    ) -> None:
        await _bus(buses).publish(Event(type=f"{_unique()}.create.stream"))
        other = _bus(buses, f"{NATS_URL}?stream={STREAM}&prefix=someone.else")
        with pytest.raises(PublishError, match="exists with subjects"):
            await other.publish(Event(type="a.b"))

    async def test_group_consumer_config(self, buses: list[Bus]) -> None:
        bus = _bus(buses)
        u = _unique()
        group = f"{u}.agent.handler"

        async def handler(event: Event) -> None:
            return None

        await bus.subscribe(f"{u}.code.*", handler, group=group, start="earliest",
                            ack_timeout=7.0, max_attempts=4, max_in_flight=16)
        name = consumer_name(group, f"{u}.code.*")
        info = await _api(bus, f"CONSUMER.INFO.{STREAM}.{name}")
        config = info["config"]
        assert config["durable_name"] == name
        assert config["filter_subject"] == f"{PREFIX}.{u}.code.*"
        assert config["ack_wait"] == 7 * 10**9
        assert config["deliver_policy"] == "all"
        assert config["ack_policy"] == "explicit"
        assert config.get("max_deliver", -1) == -1
        assert config["max_ack_pending"] >= 16

    async def test_ephemeral_consumer_is_deleted_on_stop(self, buses: list[Bus]) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        receiver = await transport.open_receiver(ConsumerSpec(
            compile_pattern(f"{u}.>"), None, "latest", 5.0, "m", 4, 3))
        name = receiver.consumer  # type: ignore[attr-defined]
        info = await _api(bus, f"CONSUMER.INFO.{STREAM}.{name}")
        assert info["config"]["deliver_policy"] == "new"
        await receiver.close()
        with pytest.raises(Exception, match="consumer not found"):
            await _api(bus, f"CONSUMER.INFO.{STREAM}.{name}")

    async def test_repeated_event_id_is_stored_once(self, buses: list[Bus]) -> None:
        bus = _bus(buses)
        u = _unique()
        event = Event(type=f"{u}.once")
        await bus.publish(event)
        await bus.publish(event)
        await _bus(buses).publish_many([event, event])
        info = await _api(bus, f"STREAM.INFO.{STREAM}", {"subjects_filter": f"{PREFIX}.{u}.>"})
        assert info["state"]["subjects"] == {f"{PREFIX}.{u}.once": 1}

    async def test_redelivery_counts_deliveries(self, buses: list[Bus]) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        spec = _spec(u, ack_timeout=5.0)
        receiver = await transport.open_receiver(spec)
        try:
            await bus.publish(Event(type=f"{u}.job"))
            first = await receiver.receive(4, 5.0)
            assert [m.delivery_count for m in first] == [1]
            await receiver.nack(first)
            second = await receiver.receive(4, 5.0)
            assert [m.delivery_count for m in second] == [2]
            assert second[0].body == first[0].body
            await receiver.extend(second)
            await receiver.ack(second)
            assert await receiver.receive(4, 0.5) == []
        finally:
            await receiver.close()


@pytest.mark.asyncio
class TestHotPaths:
    """The shortcuts of ``_Client`` (direct delivery, batched writes) and their fallbacks,
    the gathered acks and the status lines read from raw headers."""

    @pytest.mark.parametrize("without", ["direct", "batched", "both"])
    async def test_everything_works_without_the_shortcuts(
        self, buses: list[Bus], monkeypatch: pytest.MonkeyPatch, without: str
    ) -> None:
        async def refuse(self: _Client, command: bytes, messages: int, size: int) -> bool:
            return False  # as if nats-py's internals had changed: publish one by one

        if without in ("direct", "both"):  # messages reach the subscriptions' callbacks
            monkeypatch.setattr(_Client, "set_direct", lambda self, sid, handler: None)
        if without in ("batched", "both"):
            monkeypatch.setattr(_Client, "_write", refuse)
        bus = _bus(buses)
        u = _unique()
        got: list[Event] = []

        async def handler(event: Event) -> None:
            got.append(event)

        await bus.subscribe(f"{u}.>", handler, group=f"{u}-g", ack_timeout=2.0)
        events = [Event(type=f"{u}.job", payload={"n": n}) for n in range(50)]
        await bus.publish_many(events)
        await bus.publish(events[0])  # the same id again: stored once
        await _until(lambda: len(got) >= 50, what="50 events")
        await asyncio.sleep(2.5)  # past ack_timeout: nothing comes back if acks were sent
        assert sorted(str(e.id) for e in got) == sorted(str(e.id) for e in events)
        info = await _api(bus, f"STREAM.INFO.{STREAM}", {"subjects_filter": f"{PREFIX}.{u}.>"})
        assert info["state"]["subjects"] == {f"{PREFIX}.{u}.job": 50}

    async def test_ids_with_line_breaks_cannot_break_the_protocol(self, buses: list[Bus]) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        odd = OutboundMessage("x\r\nPUB evil 1\r\nX", f"{u}.odd", None, b"{}")
        await transport.send([odd])
        await transport.send([odd])  # deduplicated by the (cleaned) id
        await bus.publish(Event(type=f"{u}.after"))  # the connection is still fine
        info = await _api(bus, f"STREAM.INFO.{STREAM}", {"subjects_filter": f"{PREFIX}.{u}.>"})
        assert info["state"]["subjects"] == {f"{PREFIX}.{u}.odd": 1, f"{PREFIX}.{u}.after": 1}
        with pytest.raises(PublishError):
            await transport.send([OutboundMessage("id", f"{u}.bad subject", None, b"{}")])

    async def test_acks_gathered_between_writes_reach_the_server(
        self, buses: list[Bus]
    ) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        spec = _spec(u, ack_timeout=1.0, max_in_flight=8)
        receiver = await transport.open_receiver(spec)
        try:
            nc = await transport._connect()
            assert len(nc._direct) == 2, "the inboxes (PubAcks, this receiver) go direct"
            assert nc._batched, "nats-py's internals changed: batched writes are off"
            await bus.publish_many([Event(type=f"{u}.job", payload={"n": n}) for n in range(3)])
            messages: list[InboundMessage] = []
            while len(messages) < 3:
                messages.extend(await receiver.receive(8, 5.0))
            for message in messages:  # within ACK_INTERVAL: the later two wait for a timer
                await receiver.ack([message])
            assert await receiver.receive(8, 1.5) == [], "an acked message came back"
            name = consumer_name(f"{u}-g", f"{u}.>")
            info = await _api(bus, f"CONSUMER.INFO.{STREAM}.{name}")
            assert info["num_ack_pending"] == 0
            assert info["num_redelivered"] == 0
        finally:
            await receiver.close()

    async def test_a_deleted_consumer_is_reported_from_the_status_line(
        self, buses: list[Bus], caplog: pytest.LogCaptureFixture
    ) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        spec = _spec(u, ack_timeout=5.0)
        receiver = await transport.open_receiver(spec)
        try:
            assert await receiver.receive(4, 0.2) == []  # a pull request is now open
            name = consumer_name(f"{u}-g", f"{u}.>")
            await _api(bus, f"CONSUMER.DELETE.{STREAM}.{name}")
            with caplog.at_level("WARNING", logger="agentevents.nats"):
                started = time.monotonic()
                assert await receiver.receive(4, 1.0) == []
                assert time.monotonic() - started >= 0.9  # waited, did not spin
            assert any("is gone" in record.getMessage() for record in caplog.records)
        finally:
            await receiver.close()


    async def test_close_runs_every_step_when_the_acks_fail(
        self, buses: list[Bus], caplog: pytest.LogCaptureFixture
    ) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        nc = await transport._connect()
        durable = await transport.open_receiver(
            _spec(u))
        ephemeral = await transport.open_receiver(
            _spec(u, ephemeral=True))
        assert isinstance(durable, NatsReceiver)
        assert isinstance(ephemeral, NatsReceiver)
        assert await durable.receive(4, 0.2) == []  # pull requests are open
        await bus.publish_many([Event(type=f"{u}.job", payload={"n": n}) for n in range(4)])
        [first] = await durable.receive(1, 5.0)
        await _until(lambda: len(durable._buffer) == 3, what="the prefetched messages")
        await durable.ack([first])
        durable._acks.append(first.handle)  # one more ack still gathering at close
        real = nc.publish_each

        async def failing(subjects: Any, payload: bytes) -> None:
            if payload == b"+ACK":
                raise nats_errors.OutboundBufferLimitError
            await real(subjects, payload)

        nc.publish_each = failing  # type: ignore[method-assign]
        try:
            with caplog.at_level("WARNING", logger="agentevents.nats"):
                await durable.close()
                ephemeral._acks.append(b"$JS.ACK.x")
                await ephemeral.close()
        finally:
            nc.publish_each = real  # type: ignore[method-assign]
        assert any("writing the last acks failed" in r.getMessage() for r in caplog.records)
        # The prefetched messages were handed back (NAK): another member has them now,
        # long before the 30 s ack_wait.
        other = await transport.open_receiver(
            _spec(u))
        try:
            got: list[InboundMessage] = []
            deadline = time.monotonic() + 5
            while len(got) < 3 and time.monotonic() < deadline:
                got.extend(await other.receive(4, 0.5))
            assert len(got) == 3
            await other.ack(got)
        finally:
            await other.close()
        with pytest.raises(_ApiError) as gone:
            await _api(bus, f"CONSUMER.INFO.{STREAM}.{ephemeral.consumer}")
        assert gone.value.code == 404

    async def test_large_windows_are_written_in_chunks(self, buses: list[Bus]) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        nc = await transport._connect()
        writes: list[int] = []
        real = nc._write

        async def recording(command: bytes, messages: int, size: int) -> bool:
            writes.append(len(command))
            return await real(command, messages, size)

        nc._write = recording  # type: ignore[method-assign]
        try:
            body = b'"' + b"x" * 600_000 + b'"'
            await transport.send([OutboundMessage(str(uuid.uuid4()), f"{u}.big", None, body)
                                  for _ in range(20)])  # 12 MB in one window
        finally:
            nc._write = real  # type: ignore[method-assign]
        assert len(writes) >= 3, writes
        assert max(writes) < PUBLISH_CHUNK + 700_000, writes
        info = await _api(bus, f"STREAM.INFO.{STREAM}", {"subjects_filter": f"{PREFIX}.{u}.>"})
        assert info["state"]["subjects"] == {f"{PREFIX}.{u}.big": 20}

    async def test_a_consumer_max_batch_splits_pulls_and_its_ack_wait_is_kept(
        self, buses: list[Bus], caplog: pytest.LogCaptureFixture
    ) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        name = consumer_name(f"{u}-g", f"{u}.>")
        # Created by someone else: a max_batch and an ack_wait shorter than ours.
        await _create_consumer(bus, name, f"{u}.>", ack_wait=1.0, max_batch=2)
        spec = _spec(u)
        first = await transport.open_receiver(spec)
        second = await transport.open_receiver(spec)
        assert isinstance(first, NatsReceiver)
        assert isinstance(second, NatsReceiver)
        try:
            assert first._max_batch == 2
            assert first._keep_alive_after == pytest.approx(1 / 3)
            await bus.publish_many([Event(type=f"{u}.job", payload={"n": n}) for n in range(6)])
            with caplog.at_level("WARNING", logger="agentevents.nats"):
                [held] = await first.receive(1, 5.0)
                await _until(lambda: len(first._buffer) == 5, what="the prefetched messages")
            assert not any("refused" in r.getMessage() for r in caplog.records)

            async def keep_extending() -> None:
                while True:
                    await first.extend([held])
                    await asyncio.sleep(0.2)

            extending = asyncio.ensure_future(keep_extending())
            try:  # past the consumer's 1 s ack_wait: the buffered messages stay with first
                assert await second.receive(4, 2.5) == []
            finally:
                extending.cancel()
                await asyncio.gather(extending, return_exceptions=True)
            await first.ack([held, *first._take(5)])
        finally:
            await first.close()
            await second.close()

    async def test_a_pull_over_the_consumer_limit_is_warned_once_and_split(
        self, buses: list[Bus], caplog: pytest.LogCaptureFixture
    ) -> None:
        bus = _bus(buses)
        u = _unique()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        name = consumer_name(f"{u}-g", f"{u}.>")
        await _create_consumer(bus, name, f"{u}.>", ack_wait=30.0, max_batch=3)
        spec = _spec(u)
        receiver = await transport.open_receiver(spec)
        assert isinstance(receiver, NatsReceiver)
        receiver._max_batch = 0  # as if the limit came after we joined
        try:
            await bus.publish_many([Event(type=f"{u}.job", payload={"n": n}) for n in range(8)])
            got: list[InboundMessage] = []
            with caplog.at_level("WARNING", logger="agentevents.nats"):
                deadline = time.monotonic() + 5
                while len(got) < 8 and time.monotonic() < deadline:
                    got.extend(await receiver.receive(4, 0.5))
                    await receiver.ack(got[-4:])
            assert len(got) == 8
            assert receiver._max_batch == 3
            refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert len(refused) == 1, refused
            assert "MaxRequestBatch of 3" in refused[0]
            assert "max_batch" in refused[0]
            # A limit that splitting cannot meet: warned once, pulls pause instead of spinning.
            receiver._on_status(f"{receiver._inbox}.0", "409", "Exceeded MaxWaiting")
            assert receiver._paused_until > time.monotonic() + 0.5
        finally:
            await receiver.close()


@pytest.mark.asyncio
class TestDeadLetterStream:
    async def test_dead_letters_live_in_their_own_stream(self, buses: list[Bus]) -> None:
        bus = _bus(buses)
        u = _unique()
        group = f"{u}.agent.h"
        everything: list[Event] = []

        async def failing(event: Event) -> None:
            raise RuntimeError("boom")

        async def watch(event: Event) -> None:
            everything.append(event)

        await bus.subscribe(">", watch)
        await bus.subscribe(f"{u}.>", failing, group=group, max_attempts=2, retry_backoff=0.01)
        event = Event(type=f"{u}.bad", payload={"x": 1})
        await bus.publish(event)
        deadline = time.monotonic() + 20
        while not await bus.dead_letters(group):
            assert time.monotonic() < deadline, "no dead letter"
            await asyncio.sleep(0.05)
        [letter] = await bus.dead_letters(group)
        assert (letter.event_id, letter.attempts, letter.error_type) == (str(event.id), 2,
                                                                        "RuntimeError")
        assert await bus.dead_letters(f"{u}-other") == []
        assert letter in await bus.dead_letters()
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        subject = transport.dead_letter_subject(group)
        assert subject.startswith(f"{PREFIX}_dlq.")
        assert subject.count(".") == 1
        raw = await _api(bus, f"STREAM.MSG.GET.{STREAM}_DLQ", {"seq": 1, "next_by_subj": subject})
        message = raw["message"]
        assert DeadLetter.model_validate_json(base64.b64decode(message["data"])) == letter
        assert f"Agentevents-Group: {group}" in base64.b64decode(message["hdrs"]).decode()
        await asyncio.sleep(0.3)
        assert [e.type for e in everything if e.type.startswith(u)] == [event.type], (
            "a '>' subscriber saw a dead letter")


# -- a private server: restart ---------------------------------------------------------------


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[_Server]:
    server = _Server(tmp_path / "js")
    server.start()
    yield server
    server.kill()


@pytest.mark.asyncio
class TestAuthentication:
    @pytest.mark.parametrize(
        ("flags", "good", "bad"),
        [
            (("--user", "alice", "--pass", "s3cret"), "alice:s3cret@", "alice:wrong@"),
            (("--auth", "t0ken"), "t0ken@", "n0pe@"),
        ],
        ids=["user-password", "token"],
    )
    async def test_credentials_from_the_url(
        self, tmp_path: Path, flags: tuple[str, ...], good: str, bad: str
    ) -> None:
        server = _Server(tmp_path / "js", *flags)
        server.start()
        try:
            host = f"127.0.0.1:{server.port}?stream=AUTH&prefix=auth&connect_timeout=1"
            bus = create_bus(f"nats://{good}{host}")
            got: list[Event] = []

            async def handler(event: Event) -> None:
                got.append(event)

            try:
                await bus.subscribe("a.>", handler, group="g")
                event = Event(type="a.b")
                await bus.publish(event)
                await _until(lambda: got == [event], what="the event over an authenticated "
                             "connection")
            finally:
                await bus.close()
            refused = create_bus(f"nats://{bad}{host}")
            try:
                with pytest.raises(PublishError) as error:
                    await refused.publish(Event(type="a.b"))
                secret = bad.rstrip("@").split(":")[-1]
                assert secret not in str(error.value)
            finally:
                await refused.close()
        finally:
            server.kill()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (the cert is its own CA)."""
    return self_signed_certificate(tmp_path)


@pytest.mark.asyncio
async def test_tls_url_with_a_private_ca(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server = _Server(tmp_path / "js", "--tls", "--tlscert", str(cert), "--tlskey", str(key))
    server.start()
    try:
        bus = create_bus(f"tls://127.0.0.1:{server.port}?stream=TLS&prefix=tls&tls_ca={cert}")
        got: list[Event] = []

        async def handler(event: Event) -> None:
            got.append(event)

        try:
            await bus.subscribe("a.>", handler, group="g")
            event = Event(type="a.b")
            await bus.publish(event)
            await _until(lambda: got == [event], what="the event over TLS")
        finally:
            await bus.close()
        untrusted = create_bus(f"tls://127.0.0.1:{server.port}?connect_timeout=1")
        try:
            with pytest.raises(PublishError, match="cannot connect"):
                await untrusted.publish(Event(type="a.b"))
        finally:
            await untrusted.close()
    finally:
        server.kill()


@pytest.mark.asyncio
class TestRestart:
    async def test_publish_fails_clearly_then_recovers_and_groups_resume(
        self, private_server: _Server
    ) -> None:
        url = f"{private_server.url}?stream=RESTART&prefix=rs&publish_timeout=1"
        publisher, consumer = create_bus(url), create_bus(url)
        handled: list[str] = []

        async def handler(event: Event) -> None:
            handled.append(str(event.id))

        try:
            await consumer.subscribe("job.>", handler, group="workers", ack_timeout=2.0)
            before = [Event(type="job.before", payload={"n": n}) for n in range(20)]
            await publisher.publish_many(before)
            await _until(lambda: len(handled) >= 20, what="the events before the restart")
            # The acks are not awaited: wait until the server has taken all 20, then give
            # its consumer store a moment to write them before the SIGKILL.
            name = consumer_name("workers", "job.>")
            deadline = time.monotonic() + 10
            while True:
                info = await _api(consumer, f"CONSUMER.INFO.RESTART.{name}")
                if info["num_ack_pending"] == 0 and info["ack_floor"]["stream_seq"] >= 20:
                    break
                assert time.monotonic() < deadline, f"the acks never reached the server: {info}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)

            private_server.kill()
            with pytest.raises(PublishError) as refused:
                await publisher.publish(Event(type="job.lost"))
            text = str(refused.value)
            assert "not accepted" in text, text
            assert "no PubAck within 1 s" in text, text

            private_server.start()
            after = [Event(type="job.after", payload={"n": n}) for n in range(20)]
            deadline = time.monotonic() + 20
            while True:
                try:
                    await publisher.publish_many(after)
                    break
                except PublishError:
                    assert time.monotonic() < deadline, "publishing never recovered"
                    await asyncio.sleep(0.2)
            await _until(lambda: {str(e.id) for e in after} <= set(handled), 30,
                         what="the running subscriber to resume after the restart")
            await asyncio.sleep(2.5)  # past ack_timeout: acked events must not come back
            assert sorted(handled) == sorted(str(e.id) for e in before + after)
        finally:
            await consumer.close(timeout=2)
            await publisher.close(timeout=2)

        # A new member of the group after the restart: nothing acknowledged comes back.
        late: list[str] = []

        async def late_handler(event: Event) -> None:
            late.append(str(event.id))

        again = create_bus(url)
        try:
            await again.subscribe("job.>", late_handler, group="workers", ack_timeout=2.0)
            last = Event(type="job.last")
            await again.publish(last)
            await _until(lambda: str(last.id) in late, what="the event after rejoining")
            await asyncio.sleep(0.5)
            assert late == [str(last.id)]
        finally:
            await again.close(timeout=2)

    async def test_no_pull_requests_pile_up_while_disconnected(
        self, private_server: _Server
    ) -> None:
        url = f"{private_server.url}?stream=OUTAGE&prefix=out&publish_timeout=1"
        transport = NatsTransport.from_url(url)
        publisher = create_bus(url)
        spec = ConsumerSpec(compile_pattern("job.>"), "workers", "latest", 30.0, "m", 2, 3)
        try:
            receiver = await transport.open_receiver(spec)
            assert isinstance(receiver, NatsReceiver)
            nc = await transport._connect()
            assert await receiver.receive(2, 0.3) == []
            private_server.kill()
            await _until(lambda: not nc.is_connected, what="the disconnect")
            serial = receiver._serial
            deadline = time.monotonic() + 3.0  # an outage of 3 s, receive called throughout
            while time.monotonic() < deadline:
                assert await receiver.receive(2, 0.4) == []
            assert receiver._serial == serial, "pull requests were sent while disconnected"
            assert nc.pending_data_size < 200, "pull requests were buffered by nats-py"

            private_server.start()
            reconnected = asyncio.ensure_future(receiver.receive(2, 20.0))
            await _until(lambda: nc.is_connected, what="the reconnect")
            await publisher.publish_many([Event(type="job.x", payload={"n": n})
                                          for n in range(100)])
            # receive returns as soon as anything has arrived: the second message may come
            # in a later delivery of the same pull.
            got = list(await reconnected)
            deadline = time.monotonic() + 10.0
            while len(got) < 2 and time.monotonic() < deadline:
                got.extend(await receiver.receive(2 - len(got), 1.0))
            assert len(got) == 2
            await asyncio.sleep(1.0)  # whatever the server sends this member arrives
            # Every message delivered was asked for after the reconnect, by a request for at
            # most the core's room (2) and the prefetch (2 x 2). How many requests that took
            # depends on timing (each is renewed shortly before it expires), not the bound.
            asked = 6 * (receiver._serial - serial)
            assert 2 + len(receiver._buffer) <= asked, (len(receiver._buffer), asked)
            name = consumer_name("workers", "job.>")
            info = await transport._api(nc, f"CONSUMER.INFO.OUTAGE.{name}", None)
            assert info["num_ack_pending"] <= asked, (info["num_ack_pending"], asked)
        finally:
            await transport.close()
            await publisher.close(timeout=2)


# -- a consumer process killed in the middle --------------------------------------------------

_CONSUMER = textwrap.dedent('''
    import asyncio, sys
    from agentevents.plugins.registry import create_bus

    async def main(url, out):
        bus = create_bus(url)
        with open(out, "a", buffering=1) as sink:
            async def handler(event):
                await asyncio.sleep(0.002)
                sink.write(f"{event.payload['n']}\\n")
            await bus.subscribe("fault.>", handler, group="fault-workers", start="earliest",
                                ack_timeout=2.0, max_in_flight=8)
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
''')


@pytest.mark.asyncio
class TestConsumerProcessKilled:
    async def test_sigkill_in_the_middle_of_10000_events_loses_nothing(
        self, tmp_path: Path
    ) -> None:
        total = 10_000
        url = (f"{NATS_URL}?stream={STREAM}_FAULT&prefix={PREFIX}f"
               f"&duplicate_window=30s&max_age=10m")
        script = tmp_path / "consumer.py"
        script.write_text(_CONSUMER)
        out = tmp_path / "handled.txt"
        out.touch()

        def handled() -> list[int]:
            return [int(line) for line in out.read_text().split()]

        def start() -> subprocess.Popen[bytes]:
            process = subprocess.Popen([sys.executable, str(script), url, str(out)],
                                       stdout=subprocess.PIPE)
            assert process.stdout is not None
            assert process.stdout.readline().strip() == b"ready"
            return process

        publisher = create_bus(url)
        first = second = None
        try:
            # Create the group first (start='earliest' for a new group), then publish.
            first = start()
            events = [Event(type="fault.item", payload={"n": n}) for n in range(total)]
            await publisher.publish_many(events)
            await _until(lambda: len(handled()) >= total // 5, 60, what="a fifth handled")
            first.send_signal(signal.SIGKILL)
            first.wait()
            at_kill = len(set(handled()))
            assert at_kill < total * 0.8, "the consumer was not killed in the middle"
            second = start()
            await _until(lambda: len(set(handled())) >= total, 60,
                         what="every event after the restart")
            assert set(handled()) == set(range(total)), "events were lost"
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
            await publisher.close()
        duplicates = len(handled()) - total
        print(f"killed after {at_kill} handled; {duplicates} redelivered duplicate(s)")
        assert orjson.dumps(duplicates)  # at-least-once: duplicates are allowed


# -- a private 3-node cluster: a node dies --------------------------------------------------


class _Cluster:
    def __init__(self, root: Path) -> None:
        self.ports = [_free_port() for _ in range(3)]
        self.routes = [_free_port() for _ in range(3)]
        self.root = root
        self.processes: list[subprocess.Popen[bytes] | None] = [None, None, None]

    @property
    def url(self) -> str:
        return "nats://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, index: int) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for i, p in enumerate(self.routes)
                          if i != index)
        self.processes[index] = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.ports[index]), "-js", "-sd",
             str(self.root / f"n{index}"), "-n", f"n{index}", "--cluster_name", "ae",
             "--cluster", f"nats://127.0.0.1:{self.routes[index]}", "--routes", routes],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            self.processes[index] = None


@pytest.mark.asyncio
class TestCluster:
    async def test_replicated_stream_survives_the_loss_of_a_node(self, tmp_path: Path) -> None:
        cluster = _Cluster(tmp_path)
        for index in range(3):
            cluster.start(index)
        url = f"{cluster.url}?stream=CLUSTER&prefix=cl&replicas=3&publish_timeout=2"
        handled: list[str] = []

        async def handler(event: Event) -> None:
            handled.append(str(event.id))

        async def publish_until_accepted(bus: Bus, events: list[Event]) -> None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await bus.publish_many(events)
                    return
                except PublishError:  # JetStream elects a (new) leader meanwhile
                    assert time.monotonic() < deadline, "the cluster never accepted events"
                    await asyncio.sleep(0.5)

        publisher = consumer = None
        try:
            deadline = time.monotonic() + 30
            while True:  # the JetStream meta leader is elected a few seconds after start
                publisher = create_bus(url)
                try:
                    await publisher.publish(Event(type="warm.up"))
                    break
                except PublishError:
                    await publisher.close()
                    assert time.monotonic() < deadline, "the cluster never became ready"
                    await asyncio.sleep(0.5)
            consumer = create_bus(url)
            await consumer.subscribe("job.>", handler, group="workers", ack_timeout=3.0)
            before = [Event(type="job.before", payload={"n": n}) for n in range(200)]
            await publish_until_accepted(publisher, before)
            await _until(lambda: len(set(handled)) >= 200, 30, what="events before the loss")
            info = await _api(publisher, "STREAM.INFO.CLUSTER")
            assert len(info["cluster"]["replicas"]) == 2, "the stream is not replicated 3 times"
            leader = info["cluster"]["leader"]  # kill the stream's leader: a new one is elected
            cluster.kill(int(leader.removeprefix("n")))
            after = [Event(type="job.after", payload={"n": n}) for n in range(200)]
            await publish_until_accepted(publisher, after)
            expected = {str(e.id) for e in before + after}
            await _until(lambda: expected <= set(handled), 60,
                         what="every event after a node died")
            assert set(handled) == expected
        finally:
            for bus in (consumer, publisher):
                if bus is not None:
                    await bus.close(timeout=2)
            for index in range(3):
                cluster.kill(index)
