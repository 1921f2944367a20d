"""NATS connection options against real, dedicated servers: credentials files (decentralized
JWT auth), user/password and token from an ``authorization`` block, and mutual TLS.

Every server is a private ``nats-server`` (see ``nats_servers.py``) on a free loopback port
with JetStream in the test's tmp dir, killed at the end. For the credentials file the test is
its own operator: it makes operator, system-account, account and user nkeys with ``nkeys``
and signs NATS JWT v2 claims itself, as ``nsc`` would; the server trusts the operator and
holds the account JWTs in a ``MEMORY`` resolver.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats_servers import Server, probe_nats_server, self_signed_certificate, until
from services import require

from agentevents.core.bus import Bus
from agentevents.core.errors import (
    BackendConnectionError,
    MissingDependencyError,
    PublishError,
)
from agentevents.core.event import Event
from agentevents.plugins.registry import create_bus

require("nats-server", "the PATH or /usr/sbin/nats-server", probe_nats_server)


async def _probe_nkeys() -> None:
    import nkeys  # type: ignore[import-untyped]  # noqa: F401  (the test extra; nats-py's creds support needs it)


require("the nkeys package", "this venv (pip install -e '.[test]')", _probe_nkeys)

import nkeys  # noqa: E402  (only once require() has checked that it is installed)

# -- a tiny nsc: nkeys and signed JWT v2 claims ------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Key:
    """An nkey pair: ``seed`` (secret, ``S...``) and ``public`` (``O...``/``A...``/``U...``)."""

    seed: str
    public: str

    @classmethod
    def make(cls, prefix: int) -> _Key:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed.decode(), nkeys.from_seed(bytearray(seed)).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(bytearray(self.seed.encode())).sign(data))


def _jwt(issuer: _Key, subject: str, name: str, nats: dict[str, Any],
         expires: int | None = None) -> str:
    """A NATS JWT v2 of ``subject`` signed by ``issuer``, as the Go ``jwt`` library makes it.

    ``jti`` is the unpadded base32 SHA-512/256 of the standard claims (``aud``, ``exp``,
    ``jti`` blank, ``iat``, ``iss``, ``name``, ``nbf``, ``sub``; blanks omitted); the
    signature is ed25519 over ``header.payload`` by the issuer's seed.
    """
    claims: dict[str, Any] = {}
    if expires is not None:
        claims["exp"] = expires
    claims.update(iat=int(time.time()) - 60, iss=issuer.public, name=name, sub=subject)
    digest = hashlib.new("sha512_256", _json(claims)).digest()
    claims = {"jti": base64.b32encode(digest).rstrip(b"=").decode(), **claims,
              "nats": {**nats, "version": 2}}
    signing = f"{_b64(_json({'typ': 'JWT', 'alg': 'ed25519-nkey'}))}.{_b64(_json(claims))}"
    return f"{signing}.{_b64(issuer.sign(signing.encode()))}"


_UNLIMITED_ACCOUNT = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
    "conn": -1, "leaf": -1,
    # JetStream is on for an account whose limits give it storage.
    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
}


def _creds_text(user_jwt: str, user_seed: str) -> str:
    """The decorated ``.creds`` format that ``nsc generate creds`` writes."""
    return textwrap.dedent(f"""\
        -----BEGIN NATS USER JWT-----
        {user_jwt}
        ------END NATS USER JWT------

        ************************* IMPORTANT *************************
        NKEY Seed printed below can be used to sign and prove identity.
        NKEYs are sensitive and should be treated as secrets.

        -----BEGIN USER NKEY SEED-----
        {user_seed}
        ------END USER NKEY SEED------

        *************************************************************
        """)


@dataclass
class _Operator:
    """A server in operator mode plus the keys to mint users for its account ``APP``."""

    server: Server
    account: _Key
    root: Path

    def user(self, name: str, *, account: _Key | None = None,
             expires: int | None = None) -> tuple[Path, _Key, str]:
        """Write ``<name>.creds`` for a new user of ``account`` (default: ``APP``)."""
        key = _Key.make(nkeys.PREFIX_BYTE_USER)
        token = _jwt(account or self.account, key.public, name,
                     {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1,
                      "payload": -1}, expires=expires)
        path = self.root / f"{name}.creds"
        path.write_text(_creds_text(token, key.seed))
        path.chmod(0o600)
        return path, key, token


@pytest.fixture(scope="module")
def operator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Operator]:
    root = tmp_path_factory.mktemp("operator")
    operator = _Key.make(nkeys.PREFIX_BYTE_OPERATOR)
    system = _Key.make(nkeys.PREFIX_BYTE_ACCOUNT)
    account = _Key.make(nkeys.PREFIX_BYTE_ACCOUNT)
    # nats-server 2.9 refuses to start JetStream in operator mode without a system account
    # ("system account not setup").
    operator_jwt = _jwt(operator, operator.public, "TEST",
                        {"type": "operator", "system_account": system.public})
    system_jwt = _jwt(operator, system.public, "SYS", {"type": "account"})
    account_jwt = _jwt(operator, account.public, "APP",
                       {"type": "account", "limits": _UNLIMITED_ACCOUNT})
    config = root / "server.conf"
    config.write_text(textwrap.dedent(f"""\
        operator: {operator_jwt}
        system_account: {system.public}
        resolver: MEMORY
        resolver_preload: {{
          {system.public}: {system_jwt}
          {account.public}: {account_jwt}
        }}
        """))
    server = Server(root / "js", "-c", str(config))
    server.start()
    try:
        yield _Operator(server, account, root)
    finally:
        server.kill()


def _conf_server(tmp_path: Path, text: str) -> Server:
    config = tmp_path / "server.conf"
    config.write_text(textwrap.dedent(text))
    server = Server(tmp_path / "js", "-c", str(config))
    server.start()
    return server


async def _round_trip(url: str, members: int = 2, count: int = 6) -> None:
    """Publish ``count`` events on ``url``; a group of ``members`` buses handles each once."""
    buses: list[Bus] = []
    handled: list[str] = []

    async def handler(event: Event) -> None:
        handled.append(str(event.id))

    try:
        for _ in range(members):
            member = create_bus(url)
            buses.append(member)
            await member.subscribe("job.>", handler, group="workers", ack_timeout=5.0)
        publisher = create_bus(url)
        buses.append(publisher)
        events = [Event(type="job.run", payload={"n": n}) for n in range(count)]
        await publisher.publish_many(events)
        expected = sorted(str(e.id) for e in events)
        await until(lambda: set(expected) <= set(handled), 15,
                    what="the group to handle every event")
        await asyncio.sleep(0.2)
        assert sorted(handled) == expected, "an event was handled twice"
    finally:
        for bus in buses:
            await bus.close(timeout=2)


def _assert_refused(error: pytest.ExceptionInfo[PublishError], *words: str,
                    secrets: tuple[str, ...] = ()) -> str:
    text = str(error.value)
    assert isinstance(error.value.__cause__, BackendConnectionError), repr(error.value.__cause__)
    for word in words:
        assert word in text, text
    for secret in secrets:
        assert secret not in text, "a secret leaked into the error message"
        assert secret not in repr(error.value.__cause__)
    return text


# -- credentials files ------------------------------------------------------------------------


@pytest.mark.asyncio
class TestCredentialsFile:
    async def test_events_flow_through_a_group_over_a_jwt_user(
        self, operator_server: _Operator
    ) -> None:
        creds, _key, _token = operator_server.user("agent")
        await _round_trip(f"{operator_server.server.url}?creds={creds}&stream=CREDS"
                          "&prefix=creds")

    async def test_a_server_in_operator_mode_refuses_a_url_without_credentials(
        self, operator_server: _Operator
    ) -> None:
        bus = create_bus(f"{operator_server.server.url}?stream=CREDS&prefix=creds")
        started = time.monotonic()
        try:
            with pytest.raises(PublishError) as error:
                await bus.publish(Event(type="a.b"))
        finally:
            await bus.close()
        _assert_refused(error, "Authorization Violation", "requires authentication",
                        "?creds=")
        assert time.monotonic() - started < 3, "a refusal must not wait for the timeout"


#: Runs one publish in a child process: a creds file nats-py chokes on can hang its event
#: loop for good (no timeout fires), and a test must fail then, not hang.
_ATTEMPT = textwrap.dedent("""
    import asyncio, json, sys, time
    from agentevents.core.errors import BackendConnectionError
    from agentevents.core.event import Event
    from agentevents.plugins.registry import create_bus

    async def main(url):
        bus = create_bus(url)
        started = time.monotonic()
        try:
            await bus.publish(Event(type="a.b"))
            result = {"error": None}
        except Exception as exc:
            result = {"error": type(exc).__name__, "message": str(exc),
                      "cause": repr(exc.__cause__),
                      "connection_error": isinstance(exc.__cause__, BackendConnectionError)}
        result["seconds"] = time.monotonic() - started
        await bus.close()
        print(json.dumps(result))

    asyncio.run(main(sys.argv[1]))
""")


def _attempt(url: str) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, "-c", _ATTEMPT, url], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("publishing with this credentials file hung (nats-py's blocking read?)")
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", ["cannot read the credentials file", "No such file"]),
        ("seed-only", ["not a NATS user credentials file", "BEGIN NATS USER JWT"]),
        ("not-creds", ["not a NATS user credentials file"]),
        ("unknown-account", ["refused the connection's credentials", "Authorization Violation",
                             "an account this server trusts"]),
        ("expired", ["refused the connection's credentials", "has not expired"]),
    ],
)
def test_a_wrong_credentials_file_is_a_clear_connection_error(
    operator_server: _Operator, tmp_path: Path, case: str, words: list[str]
) -> None:
    creds, key, token = operator_server.user(f"u-{case}")
    secrets = (key.seed, token)
    if case == "missing":
        creds = tmp_path / "nowhere.creds"
    elif case == "seed-only":  # a bare nkey seed file: nats-py 2.16 would spin forever
        creds = tmp_path / "seed.nk"
        creds.write_text(f"-----BEGIN USER NKEY SEED-----\n{key.seed}\n"
                         "------END USER NKEY SEED------\n")
    elif case == "not-creds":
        creds = tmp_path / "notes.txt"
        creds.write_text(f"my seed is {key.seed}\n")
    elif case == "unknown-account":  # signed by an account the server's resolver lacks
        creds, key, token = operator_server.user(
            "stranger", account=_Key.make(nkeys.PREFIX_BYTE_ACCOUNT))
        secrets = (key.seed, token)
    elif case == "expired":
        creds, key, token = operator_server.user("late", expires=int(time.time()) - 5)
        secrets = (key.seed, token)
    result = _attempt(f"{operator_server.server.url}?creds={creds}&stream=CREDS&prefix=creds")
    assert result["error"] == "PublishError", result
    assert result["connection_error"], result["cause"]
    for word in words:
        assert word in result["message"], result["message"]
    assert str(creds) in result["message"]
    for secret in secrets:
        assert secret not in result["message"], "a secret leaked into the error"
        assert secret not in result["cause"], "a secret leaked into the error"
    # The default connect_timeout is 5 s: a refusal is reported at once, not after 10 s.
    assert result["seconds"] < 3, result


# -- user/password and token from an authorization block ----------------------------------------


@pytest.mark.asyncio
class TestAuthorizationBlock:
    async def test_user_and_percent_encoded_password(self, tmp_path: Path) -> None:
        password = "p@ss:w/rd%+"
        server = _conf_server(tmp_path, f"""\
            authorization {{
              users = [ {{user: alice, password: "{password}"}} ]
            }}
            """)
        try:
            host = f"127.0.0.1:{server.port}?stream=UP&prefix=up"
            await _round_trip(f"nats://alice:p%40ss%3Aw%2Frd%25%2B@{host}")
            bus = create_bus(f"nats://alice:{password[:4]}-wrong@{host}")
            started = time.monotonic()
            try:
                with pytest.raises(PublishError) as error:
                    await bus.publish(Event(type="a.b"))
            finally:
                await bus.close()
            assert time.monotonic() - started < 3, "a refusal must not wait for the timeout"
            _assert_refused(error, "Authorization Violation", "password of user 'alice'",
                            secrets=(f"{password[:4]}-wrong",))
        finally:
            server.kill()

    async def test_token_in_the_query_or_the_userinfo(self, tmp_path: Path) -> None:
        server = _conf_server(tmp_path, """\
            authorization {
              token: "s3cr3t-t0ken"
            }
            """)
        try:
            host = f"127.0.0.1:{server.port}"
            await _round_trip(f"nats://{host}?token=s3cr3t-t0ken&stream=TK&prefix=tk")
            await _round_trip(f"nats://s3cr3t-t0ken@{host}?stream=TK&prefix=tk")
            for url in (f"nats://{host}?token=n0pe-t0ken", f"nats://n0pe-t0ken@{host}"):
                bus = create_bus(url)
                try:
                    with pytest.raises(PublishError) as error:
                        await bus.publish(Event(type="a.b"))
                finally:
                    await bus.close()
                _assert_refused(error, "Authorization Violation", "check the token",
                                secrets=("n0pe-t0ken",))
        finally:
            server.kill()


# -- mutual TLS -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_mutual_tls_with_a_client_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)  # its own CA: signs the server and client
    server = _conf_server(tmp_path, f"""\
        tls {{
          cert_file: "{cert}"
          key_file: "{key}"
          ca_file: "{cert}"
          verify: true
          timeout: 2
        }}
        """)
    try:
        base = f"tls://127.0.0.1:{server.port}?stream=MTLS&prefix=mtls&tls_ca={cert}"
        await _round_trip(f"{base}&tls_cert={cert}&tls_key={key}")
        anonymous = create_bus(f"{base}&connect_timeout=0.5")  # trusts the server, no cert
        try:
            with pytest.raises(PublishError) as error:
                await anonymous.publish(Event(type="a.b"))
        finally:
            await anonymous.close()
        _assert_refused(error, "cannot connect")
        missing = create_bus(f"{base}&tls_cert={tmp_path / 'nope.pem'}&tls_key={key}")
        try:
            with pytest.raises(PublishError) as error:
                await missing.publish(Event(type="a.b"))
        finally:
            await missing.close()
        _assert_refused(error, "cannot load the TLS files", "nope.pem", "tls_key=***")
    finally:
        server.kill()


@pytest.mark.asyncio
async def test_creds_without_the_nkeys_package_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "nkeys" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    creds = tmp_path / "user.creds"
    creds.write_text("irrelevant")
    bus = create_bus(f"nats://127.0.0.1:1?creds={creds}")
    try:
        with pytest.raises(PublishError, match=r"pip install nkeys") as error:
            await bus.publish(Event(type="a.b"))
    finally:
        await bus.close()
    assert isinstance(error.value.__cause__, MissingDependencyError)
