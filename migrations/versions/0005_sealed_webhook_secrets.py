"""organizations.webhook_secret holds the sealed (encrypted) secret: widen it to 512.

Existing plaintext secrets stay readable and are sealed by the worker's sweep, which runs with
the production key (api/domain/secrets.py); this migration does not encrypt them, because it may
run where LIVERSCAN_SECRETS_KEY is not the one the API and workers use.

Revision ID: 0005_sealed_secrets
Revises: 0004_uploads
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005_sealed_secrets"
down_revision: str | None = "0004_uploads"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Widen webhook_secret for the sealed form."""
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.alter_column(
            "webhook_secret",
            existing_type=sa.String(length=128),
            type_=sa.String(length=512),
            existing_nullable=False,
        )


def downgrade() -> None:
    """Back to 128 characters (only after every secret was unsealed back to plaintext)."""
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.alter_column(
            "webhook_secret",
            existing_type=sa.String(length=512),
            type_=sa.String(length=128),
            existing_nullable=False,
        )
