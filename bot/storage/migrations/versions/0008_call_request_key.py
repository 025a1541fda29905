"""calls.request_key: the Telegram message a /call came from, so a redelivery starts no second call

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 12:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("request_key", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_calls_request_key", ["request_key"])


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.drop_constraint("uq_calls_request_key", type_="unique")
        batch.drop_column("request_key")
