"""on-call rings written ahead: the step's fence, its call in flight, and the ring's call

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("ring_call_id", sa.String(length=32), nullable=True))
        batch.create_index("ix_incidents_ring_call", ["ring_call_id"])
    with op.batch_alter_table("rings") as batch:
        batch.add_column(sa.Column("call_id", sa.String(length=32), nullable=True))
        batch.create_index("ix_rings_call", ["call_id"])


def downgrade() -> None:
    with op.batch_alter_table("rings") as batch:
        batch.drop_index("ix_rings_call")
        batch.drop_column("call_id")
    with op.batch_alter_table("incidents") as batch:
        batch.drop_index("ix_incidents_ring_call")
        batch.drop_column("ring_call_id")
        batch.drop_column("attempt")
