"""Dedicated ``nats-server`` processes for tests: free loopback ports, JetStream in a tmp dir.

Shared by ``test_nats_backend.py`` (restart, cluster, TLS) and ``test_nats_auth.py``
(credentials files, user/password, token, mutual TLS). Every server listens on 127.0.0.1
only, keeps its JetStream store under the test's tmp dir and is killed by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


async def probe_nats_server() -> None:
    """Raises unless the ``nats-server`` binary is there (for :func:`services.require`)."""
    if not os.access(NATS_SERVER, os.X_OK):
        raise FileNotFoundError(f"no nats-server at {NATS_SERVER} (apt-get install nats-server)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One ``nats-server -js`` on a free loopback port; ``extra`` flags are appended.

    The server's output goes to ``<store>.log``; a server that exits while starting fails
    the test with the end of that log.
    """

    def __init__(self, store: Path, *extra: str) -> None:
        self.port = free_port()
        self.store = store
        self.extra = extra
        self.log = store.with_name(f"{store.name}.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                 str(self.store), *self.extra], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.process = None
                raise RuntimeError(f"the private nats-server exited while starting:\n{tail}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("the private nats-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (the cert is its own CA).

    Skips the test when the ``openssl`` CLI is missing.
    """
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


async def until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true, polling every 20 ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
