"""Backend discovery through pluggy entry points (group ``agentevents``)."""

from agentevents.plugins.hookspecs import BackendInfo, hookimpl
from agentevents.plugins.registry import create_bus, create_store, create_transport, registry

__all__ = ["BackendInfo", "create_bus", "create_store", "create_transport", "hookimpl", "registry"]
