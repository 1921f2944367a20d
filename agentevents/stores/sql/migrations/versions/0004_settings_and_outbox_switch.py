"""Settings of the tables: the outbox becomes a property of the tables, not of a URL.

``{prefix}settings`` (``name`` PK, ``value``) holds settings every store object on these
tables obeys, whatever its URL says. The first is ``outbox``: its row (``on``) is written by
``agentevents schema enable-outbox`` (``SqlEventStore.enable_outbox()``), or by ``schema
upgrade`` / ``create_schema()`` on a store opened with ``?outbox=true``; from then on every
append to the tables records its events for the relay. Before, each writer decided by its
own URL, and one opened without ``?outbox=true`` bypassed the outbox: its events were never
published.

Tables whose outbox was in use (an outbox row still to publish, or a relay lease taken)
get the ``outbox`` row at once, so their writers and relays keep working after the upgrade;
other tables need ``agentevents schema enable-outbox`` to turn it on.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from agentevents.stores.sql.migrations import table_prefix

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# A frozen copy of this revision's options: schema.py may move on, this may not.
_MYSQL_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def upgrade() -> None:
    op.create_table(
        f"{table_prefix()}settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
        **_MYSQL_OPTIONS,
    )
    prefix = table_prefix()
    bind = op.get_bind()
    in_use = any(
        bind.execute(sa.select(sa.literal(1)).select_from(sa.table(name)).limit(1)).first()
        for name in (f"{prefix}outbox", f"{prefix}relay_lease")
    )
    if in_use:
        settings = sa.table(f"{prefix}settings", sa.column("name"), sa.column("value"))
        op.execute(settings.insert().values(name="outbox", value="on"))


def downgrade() -> None:
    op.drop_table(f"{table_prefix()}settings")
