"""account lockout counters, job deletion marks (issue 7).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add login_throttles (failed logins per email) and job_deletions (purged jobs)."""
    op.create_table(
        "login_throttles",
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("email", name=op.f("pk_login_throttles")),
    )
    op.create_table(
        "job_deletions",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("deleted_by", sa.Uuid(), nullable=True),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("objects_deleted", sa.Integer(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_deletions_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_job_deletions_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["deleted_by"], ["users.id"], name=op.f("fk_job_deletions_deleted_by_users")
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_deletions")),
    )
    with op.batch_alter_table("job_deletions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_deletions_org_id"), ["org_id"], unique=False)


def downgrade() -> None:
    """Drop the two tables."""
    with op.batch_alter_table("job_deletions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_deletions_org_id"))
    op.drop_table("job_deletions")
    op.drop_table("login_throttles")
