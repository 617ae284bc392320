"""batches (issue 6).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision (filled in by the batches work)."""


def downgrade() -> None:
    """Revert this revision."""
