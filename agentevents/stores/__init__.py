"""Event stores: the in-memory reference store (``memory://``) and the SQL store
(SQLite, PostgreSQL, MySQL/MariaDB through SQLAlchemy). Each registers through the
``agentevents`` entry points; build one with :func:`agentevents.plugins.registry.create_store`.
"""
