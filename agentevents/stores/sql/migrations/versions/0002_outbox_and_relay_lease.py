"""Outbox and relay lease: the events still to publish, and which relay publishes them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from agentevents.stores.sql.migrations import table_prefix

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# A frozen copy of this revision's options: schema.py may move on, this may not.
_MYSQL_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def upgrade() -> None:
    prefix = table_prefix()
    op.create_table(
        f"{prefix}outbox",
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        **_MYSQL_OPTIONS,
    )
    op.create_table(
        f"{prefix}relay_lease",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        **_MYSQL_OPTIONS,
    )


def downgrade() -> None:
    prefix = table_prefix()
    op.drop_table(f"{prefix}relay_lease")
    op.drop_table(f"{prefix}outbox")
