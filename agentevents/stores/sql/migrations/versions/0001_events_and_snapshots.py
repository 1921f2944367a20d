"""Events and snapshots: the store's first tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from agentevents.stores.sql.migrations import table_prefix

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copies of this revision's types and options: schema.py may move on, this may not.
_POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_MYSQL_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def upgrade() -> None:
    prefix = table_prefix()
    events = f"{prefix}events"
    op.create_table(
        events,
        sa.Column("position", _POSITION, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("stream_id", sa.String(255), nullable=False),
        sa.Column("stream_version", sa.BigInteger, nullable=False),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("event_version", sa.Integer, nullable=False),
        sa.Column("event_time_us", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("correlation_id", sa.String(255)),
        sa.Column("causation_id", sa.String(255)),
        sa.Column("partition_key", sa.String(255)),
        sa.Column("payload", _JSON_TEXT, nullable=False),
        sa.Column("metadata", _JSON_TEXT, nullable=False),
        sa.Column("recorded_at_us", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("event_id", name=f"{events}_event_id_uq"),
        sa.UniqueConstraint("stream_id", "stream_version", name=f"{events}_stream_uq"),
        **_MYSQL_OPTIONS,
    )
    op.create_index(f"{events}_type_ix", events, ["event_type", "position"])
    op.create_index(f"{events}_source_ix", events, ["source", "event_time_us"])
    op.create_index(f"{events}_correlation_ix", events, ["correlation_id", "position"])
    op.create_index(f"{events}_time_ix", events, ["event_time_us"])
    op.create_table(
        f"{prefix}snapshots",
        sa.Column("stream_id", sa.String(255), primary_key=True),
        sa.Column("stream_version", sa.BigInteger, nullable=False),
        sa.Column("state", _JSON_TEXT, nullable=False),
        sa.Column("time_us", sa.BigInteger, nullable=False),
        **_MYSQL_OPTIONS,
    )


def downgrade() -> None:
    prefix = table_prefix()
    op.drop_table(f"{prefix}snapshots")
    op.drop_table(f"{prefix}events")
