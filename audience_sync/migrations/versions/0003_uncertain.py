"""Users whose value at the destination is unknown (uncertain).

Before a page of messages is sent, its users are marked uncertain; an acknowledgement
clears the mark. A message whose fate is unknown (a timeout, a crash, a lost lease)
may still have arrived, so the next run re-sends the truth to every uncertain user,
even when the truth equals the snapshot again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 17:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "uncertain",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column(
            "run_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("key", "user_id", name=op.f("pk_uncertain")),
    )


def downgrade() -> None:
    op.drop_table("uncertain")
