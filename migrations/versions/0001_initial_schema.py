"""initial schema

Artifacts, pools and their files, primitive tasks, their classes and experts, the active
pool, assembled models and jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 22:36:53.157548
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("location", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_artifacts")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("log", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("work_dir", sa.String(length=500), nullable=True),
        sa.Column("pool_version", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])
    op.create_table(
        "pools",
        sa.Column("version", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("pool_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=500), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("work_dir", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_pools_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_pools")),
    )
    op.create_index(op.f("ix_pools_pool_id"), "pools", ["pool_id"])
    op.create_table(
        "active_pool",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pool_version", sa.Integer(), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_version"], ["pools.version"], name=op.f("fk_active_pool_pool_version_pools")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_active_pool")),
    )
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
        sa.ForeignKeyConstraint(
            ["pool_version"],
            ["pools.version"],
            name=op.f("fk_assembled_models_pool_version_pools"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sha256"], ["artifacts.sha256"], name=op.f("fk_assembled_models_sha256_artifacts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assembled_models")),
        sa.UniqueConstraint(
            "pool_version", "tasks", "output", "weights", name=op.f("uq_assembled_models_pool_version")
        ),
    )
    op.create_table(
        "pool_files",
        sa.Column("pool_version", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=300), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_version"],
            ["pools.version"],
            name=op.f("fk_pool_files_pool_version_pools"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sha256"], ["artifacts.sha256"], name=op.f("fk_pool_files_sha256_artifacts")
        ),
        sa.PrimaryKeyConstraint("pool_version", "path", name=op.f("pk_pool_files")),
    )
    op.create_table(
        "primitive_tasks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("pool_version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_version"],
            ["pools.version"],
            name=op.f("fk_primitive_tasks_pool_version_pools"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_primitive_tasks")),
        sa.UniqueConstraint("pool_version", "name", name=op.f("uq_primitive_tasks_pool_version")),
    )
    op.create_index(op.f("ix_primitive_tasks_pool_version"), "primitive_tasks", ["pool_version"])
    op.create_table(
        "experts",
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("onnx_sha256", sa.String(length=64), nullable=False),
        sa.Column("logits_sha256", sa.String(length=64), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=False),
        sa.Column("flops", sa.BigInteger(), nullable=False),
        sa.Column("onnx_bytes", sa.BigInteger(), nullable=False),
        sa.Column("val_acc", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["logits_sha256"], ["artifacts.sha256"], name=op.f("fk_experts_logits_sha256_artifacts")
        ),
        sa.ForeignKeyConstraint(
            ["onnx_sha256"], ["artifacts.sha256"], name=op.f("fk_experts_onnx_sha256_artifacts")
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["primitive_tasks.id"],
            name=op.f("fk_experts_task_id_primitive_tasks"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["weights_sha256"], ["artifacts.sha256"], name=op.f("fk_experts_weights_sha256_artifacts")
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_experts")),
    )
    op.create_table(
        "task_classes",
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("class_index", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["primitive_tasks.id"],
            name=op.f("fk_task_classes_task_id_primitive_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", "position", name=op.f("pk_task_classes")),
    )


def downgrade() -> None:
    op.drop_table("task_classes")
    op.drop_table("experts")
    op.drop_index(op.f("ix_primitive_tasks_pool_version"), table_name="primitive_tasks")
    op.drop_table("primitive_tasks")
    op.drop_table("pool_files")
    op.drop_table("assembled_models")
    op.drop_table("active_pool")
    op.drop_index(op.f("ix_pools_pool_id"), table_name="pools")
    op.drop_table("pools")
    op.drop_index(op.f("ix_jobs_status"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("artifacts")
