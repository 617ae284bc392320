"""login_addresses: the addresses each user signed in from, with their own failed-login counts
(smart lockout: failures from elsewhere no longer lock a user out of the addresses they use).

login_throttles keeps its rows and now counts only failures from unfamiliar addresses; no user
has a familiar address until their next successful login.

Revision ID: 0006_login_addresses
Revises: 0005_sealed_secrets
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006_login_addresses"
down_revision: str | None = "0005_sealed_secrets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add login_addresses (user, address, last login, failures, lock)."""
    op.create_table(
        "login_addresses",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_login_addresses_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "address", name=op.f("pk_login_addresses")),
    )


def downgrade() -> None:
    """Drop login_addresses (every address is unfamiliar again)."""
    op.drop_table("login_addresses")
