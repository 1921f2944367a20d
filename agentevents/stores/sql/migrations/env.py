"""Alembic's environment for the SQL store: migrate on the connection the store hands over.

Alembic runs this file for every command; :func:`agentevents.stores.sql.migrations.upgrade`
puts the connection (already in the store's transaction, holding the schema lock) and the
table prefix in ``config.attributes``. There is no engine, URL or ini file here, and no
offline (``--sql``) mode.
"""

from __future__ import annotations

from alembic import context

from agentevents.core.errors import ConfigurationError
from agentevents.stores.sql.migrations import include_name, version_table
from agentevents.stores.sql.schema import tables

config = context.config
connection = config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise ConfigurationError(
        "the SQL store's migrations run on a store's connection: call "
        "`await store.create_schema()` or `agentevents schema upgrade --store URL`"
    )
prefix: str = config.attributes["table_prefix"]

context.configure(
    connection=connection,
    target_metadata=tables(prefix).metadata,
    version_table=version_table(prefix),
    include_name=include_name(prefix),
    compare_type=True,
)
with context.begin_transaction():  # inside the store's transaction: only a marker
    context.run_migrations()
