"""models are functions: no row per query

Composite models are no longer stored: drop `assembled_models` and the artifact rows of
their blobs; count requests per primitive task instead (`task_requests`, bounded by the
pools' tasks), and let workers announce themselves (`workers`) so readiness can tell
when none is running. Blob files of old assembled models stay on disk (the migration
does not know the blob directory); `POE_DATA_DIR/blobs` entries no artifact row names can
be deleted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("assembled_models")
    op.execute(sa.text("DELETE FROM artifacts WHERE kind = 'model'"))
    op.create_table(
        "task_requests",
        sa.Column("pool_version", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("last_requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["pool_version"], ["pools.version"],
                                name=op.f("fk_task_requests_pool_version_pools"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pool_version", "task", name=op.f("pk_task_requests")),
    )
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("task_requests")
    op.create_table(
        "assembled_models",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("pool_version", sa.Integer(), nullable=False),
        sa.Column("tasks", sa.Text(), nullable=False),
        sa.Column("output", sa.String(length=16), nullable=False),
        sa.Column("weights", sa.String(length=8), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=False),
        sa.Column("flops", sa.BigInteger(), nullable=False),
        sa.Column("val_acc", sa.Float(), nullable=False),
        sa.Column("assembly_ms", sa.Float(), nullable=False),
        sa.Column("hits", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["pool_version"], ["pools.version"],
                                name=op.f("fk_assembled_models_pool_version_pools"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["sha256"], ["artifacts.sha256"],
                                name=op.f("fk_assembled_models_sha256_artifacts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assembled_models")),
        sa.UniqueConstraint("pool_version", "tasks", "output", "weights",
                            name=op.f("uq_assembled_models_pool_version")),
    )
