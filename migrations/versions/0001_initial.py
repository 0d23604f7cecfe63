"""The first schema: jobs, their trials, per-epoch trial metrics and job events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The statuses as of this revision (a migration never imports the models it predates).
JOB_STATUSES = ("queued", "submitted", "running", "succeeded", "failed", "cancelled")
TRIAL_STATUSES = ("pending", "running", "succeeded", "failed", "stopped")


def status(*values: str, name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=16)


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", status(*JOB_STATUSES, name="jobstatus"), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("num_trials", sa.Integer(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.Column("started_at", timestamp(), nullable=True),
        sa.Column("finished_at", timestamp(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("ray_submission_id", sa.String(length=128), nullable=True),
        sa.Column("dashboard_url", sa.Text(), nullable=True),
        sa.Column("ray_cleanup_pending", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"])
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("from_status", status(*JOB_STATUSES, name="jobstatus"), nullable=True),
        sa.Column("to_status", status(*JOB_STATUSES, name="jobstatus"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index(op.f("ix_job_events_job_id"), "job_events", ["job_id"])

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", status(*TRIAL_STATUSES, name="trialstatus"), nullable=False),
        sa.Column("clean_acc", sa.Float(), nullable=True),
        sa.Column("robust_acc", sa.Float(), nullable=True),
        sa.Column("best_epoch", sa.Integer(), nullable=True),
        sa.Column("checkpoint_uri", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_trials_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trials")),
        sa.UniqueConstraint("job_id", "key", name=op.f("uq_trials_job_id_key")),
    )
    op.create_index(op.f("ix_trials_job_id"), "trials", ["job_id"])

    op.create_table(
        "trial_metrics",
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("train_acc", sa.Float(), nullable=True),
        sa.Column("val_clean_acc", sa.Float(), nullable=True),
        sa.Column("val_robust_acc", sa.Float(), nullable=True),
        sa.Column("lr", sa.Float(), nullable=True),
        sa.Column("epoch_seconds", sa.Float(), nullable=True),
        sa.Column("images_per_second", sa.Float(), nullable=True),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["trial_id"],
            ["trials.id"],
            name=op.f("fk_trial_metrics_trial_id_trials"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trial_id", "epoch", name=op.f("pk_trial_metrics")),
    )


def downgrade() -> None:
    op.drop_table("trial_metrics")
    op.drop_index(op.f("ix_trials_job_id"), table_name="trials")
    op.drop_table("trials")
    op.drop_index(op.f("ix_job_events_job_id"), table_name="job_events")
    op.drop_table("job_events")
    op.drop_index(op.f("ix_jobs_status"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_created_at"), table_name="jobs")
    op.drop_table("jobs")
