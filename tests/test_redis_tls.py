"""The Redis Streams bus over TLS (``rediss://``), against a private ``redis-server`` that
requires TLS and a client certificate (``tls-auth-clients yes``, Redis' default).

The module makes a throw-away CA, a server and a client certificate with the ``openssl``
command, starts ``redis-server --port 0 --tls-port <free port>`` on loopback, and removes
both at the end. It runs the conformance classes that exercise connections the most
(round trips, redelivery, closing and cancelling blocked reads) over TLS, plus the
certificate options. Without ``redis-server`` or ``openssl``, or with a ``redis-server``
built without TLS, it skips loudly on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("redis")

from agentevents.backends.redis.transport import RedisBusConfig
from agentevents.conformance_tests.helpers import Collector
from agentevents.conformance_tests.test_bus import (  # noqa: F401
    TestLifecycle,
    TestPublishSubscribe,
    TestRedelivery,
)
from agentevents.core.errors import ConfigurationError, PublishError
from agentevents.core.event import Event
from agentevents.plugins.registry import create_bus

pytestmark = [pytest.mark.bus_conformance, pytest.mark.asyncio]


def _skip_or_fail(message: str) -> None:
    message = f"REDIS TLS NOT TESTED: {message}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


_MISSING = [name for name in ("redis-server", "openssl") if shutil.which(name) is None]
if _MISSING:
    _skip_or_fail(f"{' and '.join(_MISSING)} not installed")

_LEAF_EXTENSIONS = """\
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
"""


@dataclass
class TlsServer:
    port: int
    directory: Path

    def file(self, name: str) -> str:
        return str(self.directory / name)

    def url(self, prefix: str, **options: str) -> str:
        query = "&".join(f"{name}={quote(value)}" for name, value in
                         {"prefix": prefix, **options}.items())
        return f"rediss://127.0.0.1:{self.port}/0?{query}"

    def trusted_url(self, prefix: str) -> str:
        """Verifies the server against the test CA and shows the client certificate."""
        return self.url(prefix, ssl_ca_certs=self.file("ca.pem"),
                        ssl_certfile=self.file("client.pem"),
                        ssl_keyfile=self.file("client.key"))


def _openssl(directory: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True,
                          timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def _make_certificates(directory: Path) -> None:
    """A CA, and a server and a client certificate it signed (EC P-256, valid one day)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(directory, "req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=agentevents test CA",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (directory / "leaf.cnf").write_text(_LEAF_EXTENSIONS)
    for name in ("server", "client"):
        _openssl(directory, "req", "-new", *ec, "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN=agentevents test {name}")
        _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
                 "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", "leaf.cnf")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    directory = Path(tempfile.mkdtemp(prefix="agentevents-redis-tls-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        _make_certificates(directory)
        port = _free_port()
        log = directory / "redis.log"
        server = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
             "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "yes",
             "--save", "", "--appendonly", "no", "--dir", str(directory),
             "--logfile", str(log)],
            cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            if server.poll() is not None:  # e.g. built without TLS: "Bad directive"
                stderr = server.stderr.read().decode() if server.stderr else ""
                shown = log.read_text() if log.exists() else ""
                _skip_or_fail(f"redis-server would not start with --tls-port (built without "
                              f"TLS?): {(stderr + shown).strip()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not listen on TLS port {port}") from None
                time.sleep(0.05)
        yield TlsServer(port, directory)
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGKILL)
            server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def bus_url(tls_server: TlsServer) -> str:
    """The conformance classes above run over mutual TLS."""
    return tls_server.trusted_url(f"aetls-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def prefix() -> str:
    return f"aetls-{uuid.uuid4().hex[:10]}"


async def _publish_error(url: str) -> str:
    bus = create_bus(url)
    try:
        started = time.monotonic()
        with pytest.raises(PublishError) as failed:
            await bus.publish(Event(type="tls.probe"))
        assert time.monotonic() - started < 10, "a TLS failure must not hang"
        return str(failed.value)
    finally:
        await bus.close()


async def test_a_server_certificate_from_an_unknown_ca_is_refused(
    tls_server: TlsServer, prefix: str
) -> None:
    message = await _publish_error(tls_server.url(  # the system's CAs only
        prefix, ssl_certfile=tls_server.file("client.pem"),
        ssl_keyfile=tls_server.file("client.key")))
    assert "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message
    assert f"rediss://127.0.0.1:{tls_server.port}" in message


async def test_a_client_without_certificate_is_refused(
    tls_server: TlsServer, prefix: str
) -> None:
    message = await _publish_error(tls_server.url(prefix,
                                                  ssl_ca_certs=tls_server.file("ca.pem")))
    assert f"127.0.0.1:{tls_server.port}" in message


async def test_verification_can_be_turned_off(tls_server: TlsServer, prefix: str) -> None:
    bus = create_bus(tls_server.url(prefix, ssl_cert_reqs="none",
                                    ssl_certfile=tls_server.file("client.pem"),
                                    ssl_keyfile=tls_server.file("client.key")))
    try:
        received = Collector("member")
        await bus.subscribe("tls.>", received, group="g")
        event = Event(type="tls.unverified")
        await bus.publish(event)
        await received.wait_for_events([event])
    finally:
        await bus.close()


async def test_certificate_files_are_checked_when_the_url_is_read(
    tls_server: TlsServer
) -> None:
    config = RedisBusConfig.from_url(tls_server.trusted_url("x"))
    assert (config.tls, config.ssl_ca_certs, config.ssl_cert_reqs) == (
        True, tls_server.file("ca.pem"), "required")
    missing = str(tls_server.directory / "missing.pem")
    for option in ("ssl_ca_certs", "ssl_certfile"):
        with pytest.raises(ConfigurationError, match=f"{option} names no readable file"):
            RedisBusConfig.from_url(tls_server.url("x", **{option: missing}))
    with pytest.raises(ConfigurationError, match="ssl_keyfile needs ssl_certfile"):
        RedisBusConfig.from_url(tls_server.url("x", ssl_keyfile=tls_server.file("client.key")))
    with pytest.raises(ConfigurationError, match="ssl_cert_reqs"):
        RedisBusConfig.from_url(tls_server.url("x", ssl_cert_reqs="sometimes"))
