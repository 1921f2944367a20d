"""The shipped bus conformance suite, run against a real Redis server.

``AGENTEVENTS_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) names the server. Every
run uses its own key prefix and deletes its keys afterwards (``SCAN`` + ``DEL`` on the
prefix; the server is never flushed). Unreachable Redis skips this module on a laptop and
fails it in CI (``CI=true``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from services import REDIS_URL, delete_prefix, probe_redis, require

from agentevents.conformance_tests.test_bus import *  # noqa: F403

require("REDIS", REDIS_URL, probe_redis)


@pytest.fixture(scope="session")
def bus_url() -> Iterator[str]:
    prefix = f"aetest-{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in REDIS_URL else "?"
    yield f"{REDIS_URL}{sep}prefix={prefix}"
    delete_prefix(REDIS_URL, prefix)
