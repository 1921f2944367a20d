"""The core: event envelope, bus and store interfaces, the shared delivery loop.

The core knows no backend; backends depend on it, never the other way round.
"""
