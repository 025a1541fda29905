"""retention: audit.redacted, and indexes to find old rows in bounded batches

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit") as batch:
        batch.add_column(
            sa.Column("redacted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_index("ix_calls_created_at", "calls", ["created_at"])
    op.create_index(
        op.f("ix_webhook_deliveries_received_at"), "webhook_deliveries", ["received_at"]
    )
    op.create_index("ix_rings_at", "rings", ["at"])
    op.create_index(
        op.f("ix_permission_requests_requested_at"), "permission_requests", ["requested_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_permission_requests_requested_at"), table_name="permission_requests")
    op.drop_index("ix_rings_at", table_name="rings")
    op.drop_index(op.f("ix_webhook_deliveries_received_at"), table_name="webhook_deliveries")
    op.drop_index("ix_calls_created_at", table_name="calls")
    with op.batch_alter_table("audit") as batch:
        batch.drop_column("redacted")
