"""Alembic's entry point: migrates the connection that ``llmserve.ledger.migrate`` hands over."""

from __future__ import annotations

from alembic import context

from llmserve.ledger.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run ledger migrations through llmserve.ledger.migrate.upgrade, which passes a connection")

# Batch mode lets later revisions alter SQLite tables (by copying them), which plain ALTER cannot.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
