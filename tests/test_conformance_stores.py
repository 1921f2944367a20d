"""The shipped store conformance suite, run against the built-in stores.

The same one-line import a third-party store uses; ``store_url`` is overridden to run
every test against the in-memory store (private and named), SQLite ``:memory:`` and a
SQLite file shared by the whole session.
"""

from __future__ import annotations

import contextlib

import pytest

from agentevents.conformance_tests.test_outbox import *  # noqa: F403
from agentevents.conformance_tests.test_store import *  # noqa: F403
from agentevents.plugins.registry import registry
from agentevents.stores import memory, sql

# The built-in stores register through their entry points once the package is installed;
# from a source checkout register them the same way a script would. Same names, so the
# entry-point loader skips them later instead of registering them twice.
for name, plugin in (("memory_store", memory), ("sql", sql)):
    with contextlib.suppress(ValueError):  # already registered
        registry.register(plugin, name=name)

STORE_URLS = {
    "memory": "memory://",
    "memory-named": "memory://conformance",
    "sqlite-memory": "sqlite+aiosqlite:///:memory:",
    "sqlite-file": None,  # a file in the session's temporary directory
}


@pytest.fixture(scope="session", params=list(STORE_URLS))
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Each built-in store URL in turn."""
    url = STORE_URLS[request.param]
    if url is None:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('store') / 'events.db'}"
    return url
