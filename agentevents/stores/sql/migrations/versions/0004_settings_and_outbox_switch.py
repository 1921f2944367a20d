"""Settings of the tables: the outbox becomes a property of the tables, not of a URL.

``{prefix}settings`` (``name`` PK, ``value``) holds settings every store object on these
tables obeys, whatever its URL says. The first is ``outbox``: its row (``on``) is written by
``agentevents schema enable-outbox`` (``SqlEventStore.enable_outbox()``), or by ``schema
upgrade`` / ``create_schema()`` on a store opened with ``?outbox=true``; from then on every
append to the tables records its events for the relay. Before, each writer decided by its
own URL, and one opened without ``?outbox=true`` bypassed the outbox: its events were never
published.

This revision adds the table only; it enables nothing. Tables whose writers used
``?outbox=true`` need ``agentevents schema enable-outbox`` once after upgrading.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
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


def downgrade() -> None:
    op.drop_table(f"{table_prefix()}settings")
