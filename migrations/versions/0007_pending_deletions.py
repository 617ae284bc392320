"""pending_deletions: store keys whose deletion failed (an outage, a failing call) while a job
was deleted by an admin or by retention; the sweep retries them until they are gone.

Revision ID: 0007_pending_deletions
Revises: 0006_login_addresses
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007_pending_deletions"
down_revision: str | None = "0006_login_addresses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add pending_deletions (key, job, attempts, last attempt, error)."""
    op.create_table(
        "pending_deletions",
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_pending_deletions_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_pending_deletions")),
    )


def downgrade() -> None:
    """Drop pending_deletions (keys still listed there are no longer retried)."""
    op.drop_table("pending_deletions")
