"""Count re-sent changes per key in a run (run_keys.resent).

Changes are now written to history once, when their outcome is known; the pending
count of a run that was killed is derived from its counts, which need `resent`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 17:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run_keys") as batch_op:
        batch_op.add_column(
            sa.Column("resent", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("run_keys") as batch_op:
        batch_op.drop_column("resent")
