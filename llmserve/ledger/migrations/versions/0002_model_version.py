"""The version (GGUF sha256 prefix) of the model that answered each request.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("model_version", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:  # SQLite drops a column only by copying the table
        batch.drop_column("model_version")
