"""teams.layers and teams.overrides: shifts with hand-offs and who covers when;
teams.locale: the language of its rings and post; contacts.telegram_id: who "I" is in
`/oncall take`

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("layers", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("overrides", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("locale", sa.String(8), nullable=True))
    with op.batch_alter_table("contacts") as batch:
        batch.add_column(sa.Column("telegram_id", sa.BigInteger(), nullable=True))
        batch.create_index("ix_contacts_telegram_id", ["telegram_id"])


def downgrade() -> None:
    with op.batch_alter_table("contacts") as batch:
        batch.drop_index("ix_contacts_telegram_id")
        batch.drop_column("telegram_id")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("locale")
        batch.drop_column("overrides")
        batch.drop_column("layers")
