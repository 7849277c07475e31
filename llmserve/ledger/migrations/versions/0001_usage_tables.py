"""Usage records and hourly rollups.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64)),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("started_hour", sa.DateTime(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("queue_seconds", sa.Double()),
        sa.Column("ttft_seconds", sa.Double()),
        sa.Column("total_seconds", sa.Double(), nullable=False),
        sa.Column("engine_seconds", sa.Double(), nullable=False),
        sa.Column("finish_reason", sa.String(255), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("cost", sa.Double(), nullable=False),
        sa.Column("price_version", sa.String(64), nullable=False),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_usage_records_tenant_started_at", "usage_records", ["tenant", "started_at"])
    op.create_index("ix_usage_records_started_at", "usage_records", ["started_at"])
    op.create_table(
        "usage_hourly",
        sa.Column("hour", sa.DateTime(), primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("engine_seconds", sa.Double(), nullable=False),
        sa.Column("cost", sa.Double(), nullable=False),
    )
    op.create_index("ix_usage_hourly_tenant_hour", "usage_hourly", ["tenant", "hour"])


def downgrade() -> None:
    op.drop_table("usage_hourly")
    op.drop_table("usage_records")
