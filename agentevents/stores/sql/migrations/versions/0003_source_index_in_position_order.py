"""The source index in position order: an agent's timeline pages like the other filters.

``{prefix}events_source_ix`` was ``(source, event_time_us)``. Every query is read in
position order and continues after a position, so an agent's timeline had to fetch and sort
all of its events for each page. Now it is ``(source, position)``, like the type and
correlation indexes: a page is one ordered range of the index, and a time range on top
combines it with ``{prefix}events_time_ix``.

Rebuilding the index blocks appends to the table while it is built (in one transaction
on PostgreSQL): upgrade a large store at a quiet moment. MySQL/MariaDB commit every DDL
statement on its own, so there the index is swapped in one ``ALTER TABLE`` (drop and add
together): a failure leaves the old index, never none.

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


def _swap(columns: list[str]) -> None:
    events = f"{table_prefix()}events"
    index = f"{events}_source_ix"
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        op.execute(f"ALTER TABLE `{events}` DROP INDEX `{index}`, "
                   f"ADD INDEX `{index}` ({', '.join(f'`{c}`' for c in columns)})")
        return
    op.drop_index(index, table_name=events)
    op.create_index(index, events, columns)


def upgrade() -> None:
    _swap(["source", "position"])


def downgrade() -> None:
    _swap(["source", "event_time_us"])
