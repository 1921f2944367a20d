"""The conformance suite: the definition of a correct agentevents backend.

Run it against any bus or store URL::

    pytest --pyargs agentevents.conformance_tests --bus-url URL --store-url URL
    agentevents conformance --bus URL --store URL

or, SQLAlchemy-dialect style, from a backend's own test module::

    from agentevents.conformance_tests.test_bus import *    # noqa: F403

    @pytest.fixture(scope="session")
    def bus_url() -> str:
        return "mybroker://127.0.0.1:1234"

A store that implements the transactional outbox (:class:`~agentevents.core.outbox.Outbox`)
also imports ``agentevents.conformance_tests.test_outbox``; stores without one skip it.

Every test uses names unique to itself, so the suite can run on shared infrastructure.
Tests that need a capability the backend does not declare are skipped with that reason.
"""
