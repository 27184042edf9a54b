"""Alembic environment: always run on a connection that audience-sync hands over."""

from __future__ import annotations

from alembic import context

from audience_sync.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with `audience-sync db upgrade`, which opens the store"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
