"""Evaluation a reviewer accepts, and trials that say why they ended: AutoAttack results and
validation scores on trials, checkpoints kept by the service, the robustness curves of evaluate
jobs, uploaded model files, and the spec as submitted.

Trials lose ``checkpoint_uri``: a checkpoint is now what the service stored itself (its
``checkpoint_sha256``), never a path a worker named. Checkpoints of trials older than this
revision stay where they were, unserved.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("submitted_spec", sa.JSON(), nullable=True))
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("autoattack_acc", sa.Float(), nullable=True))
        batch.add_column(sa.Column("autoattack", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("val_clean_acc", sa.Float(), nullable=True))
        batch.add_column(sa.Column("val_robust_acc", sa.Float(), nullable=True))
        batch.add_column(sa.Column("checkpoint_epoch", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("checkpoint_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.drop_column("checkpoint_uri")
    op.create_table(
        "curve_points",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("clean_acc", sa.Float(), nullable=True),
        sa.Column("robust_acc", sa.Float(), nullable=True),
        sa.Column("autoattack_acc", sa.Float(), nullable=True),
        sa.Column("autoattack", sa.JSON(), nullable=True),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["trials.id"],
            name=op.f("fk_curve_points_trial_id_trials"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_curve_points")),
        sa.UniqueConstraint("trial_id", "epsilon", name=op.f("uq_curve_points_trial_id_epsilon")),
    )
    op.create_index(op.f("ix_curve_points_trial_id"), "curve_points", ["trial_id"])
    op.create_table(
        "models",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_models_owner_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
    )
    op.create_index(op.f("ix_models_owner_id"), "models", ["owner_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_models_owner_id"), table_name="models")
    op.drop_table("models")
    op.drop_index(op.f("ix_curve_points_trial_id"), table_name="curve_points")
    op.drop_table("curve_points")
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("checkpoint_uri", sa.Text(), nullable=True))
        for column in (
            "reason",
            "checkpoint_bytes",
            "checkpoint_sha256",
            "checkpoint_epoch",
            "val_robust_acc",
            "val_clean_acc",
            "autoattack",
            "autoattack_acc",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("submitted_spec")
