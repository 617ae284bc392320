"""Alembic migrations of the liverscan schema."""
