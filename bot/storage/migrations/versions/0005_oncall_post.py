"""incidents: the post as an outbox step; teams: acknowledgement timeout and re-page policy

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.add_column(
            sa.Column("ack_timeout", sa.Integer(), server_default="14400", nullable=False)
        )
        batch.add_column(
            sa.Column("repage_after", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(
            sa.Column("post_status", sa.String(16), server_default="posted", nullable=False)
        )
        batch.add_column(
            sa.Column("post_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("post_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("admins_told_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("exhausted_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_incidents_post_next_at", ["post_next_at"], unique=False)
    # Open incidents that were never posted get their post now.
    op.execute(
        "UPDATE incidents SET post_status = 'pending', post_next_at = updated_at "
        "WHERE post_message_id IS NULL AND status IN ('firing', 'acknowledged')"
    )


def downgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.drop_index("ix_incidents_post_next_at")
        for column in ("exhausted_at", "admins_told_at", "post_next_at", "post_attempts"):
            batch.drop_column(column)
        batch.drop_column("post_status")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("repage_after")
        batch.drop_column("ack_timeout")
