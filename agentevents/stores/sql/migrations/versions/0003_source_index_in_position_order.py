"""The source index in position order: an agent's timeline pages like the other filters.

``{prefix}events_source_ix`` was ``(source, event_time_us)``. Every query is read in
position order and continues after a position, so an agent's timeline had to fetch and sort
all of its events for each page. Now it is ``(source, position)``, like the type and
correlation indexes: a page is one ordered range of the index, and a time range on top
combines it with ``{prefix}events_time_ix``.

Rebuilding the index blocks appends to the table while it is built (in one transaction
on PostgreSQL): upgrade a large store at a quiet moment.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

from agentevents.stores.sql.migrations import table_prefix

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    events = f"{table_prefix()}events"
    op.drop_index(f"{events}_source_ix", table_name=events)
    op.create_index(f"{events}_source_ix", events, ["source", "position"])


def downgrade() -> None:
    events = f"{table_prefix()}events"
    op.drop_index(f"{events}_source_ix", table_name=events)
    op.create_index(f"{events}_source_ix", events, ["source", "event_time_us"])
