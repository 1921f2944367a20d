"""The shipped bus conformance suite, run against the in-memory reference backend."""

import pytest

from agentevents.conformance_tests.test_bus import *  # noqa: F403
from agentevents.conformance_tests.test_bus import TestLimits


@pytest.fixture(scope="session")
def bus_url() -> str:
    return "memory://"


class TestLimitsWithDeclaredMaximum(TestLimits):
    """``memory://`` has no payload limit by default; run the limit tests with one set."""

    @pytest.fixture
    def bus_url(self) -> str:
        return "memory://?max_payload_bytes=65536"
