"""account lockout counters, job deletion marks (issue 7).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision (filled in by the security work)."""


def downgrade() -> None:
    """Revert this revision."""
