"""incidents.alert_items, incidents.alert_count: a group's first alerts and its size

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("alert_items", sa.JSON(), server_default="[]", nullable=False))
        batch.add_column(sa.Column("alert_count", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.drop_column("alert_count")
        batch.drop_column("alert_items")
