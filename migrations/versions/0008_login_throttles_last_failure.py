"""login_throttles.last_failure_at indexed: the sweep deletes stale counts of failed logins by that
column (accounts.forget_stale_throttles), and the table holds a row per email ever tried, known or
not, so without the index every sweep read the whole table.

Revision ID: 0008_throttles_last_failure
Revises: 0007_pending_deletions
"""

from __future__ import annotations

from alembic import op

revision: str = "0008_throttles_last_failure"
down_revision: str | None = "0007_pending_deletions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Index login_throttles.last_failure_at."""
    with op.batch_alter_table("login_throttles", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_login_throttles_last_failure_at"), ["last_failure_at"], unique=False
        )


def downgrade() -> None:
    """Drop the index (the sweep reads the whole table again)."""
    with op.batch_alter_table("login_throttles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_login_throttles_last_failure_at"))
