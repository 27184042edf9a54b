"""Alembic migrations of the state store, shipped as audience_sync.migrations."""
