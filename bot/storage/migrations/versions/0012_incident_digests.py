"""incidents.digest_id, incidents.digest_shown: alerts past a team's share of posts in a minute
share one digest post (its first incident holds the post)

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-01 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("digest_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("digest_shown", sa.String(16), nullable=True))
        batch.create_index("ix_incidents_digest", ["digest_id"])


def downgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.drop_index("ix_incidents_digest")
        batch.drop_column("digest_shown")
        batch.drop_column("digest_id")
