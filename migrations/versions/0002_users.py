"""Users and their hashed API tokens, job owners and priorities, and the audit trail.

Every job there is belongs to the bootstrap admin afterwards: the user named "admin", made
here, whose token is the service's ADVORCH_API_TOKEN (or $ADVORCH_HOME/api_token), hashed into
api_tokens when the service starts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As of this revision (a migration never imports the models it predates).
BOOTSTRAP_ADMIN = "admin"
JOB_PRIORITIES = ("low", "normal", "high")
ACTOR_KINDS = ("user", "worker")
AUDIT_ACTIONS = (
    "job.submit",
    "job.cancel",
    "job.report",
    "user.create",
    "user.disable",
    "user.limits",
    "token.issue",
    "token.revoke",
)


def small_enum(*values: str, name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, length=16)


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("disabled_at", timestamp(), nullable=True),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_trials_per_job", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.bulk_insert(
        users, [{"name": BOOTSTRAP_ADMIN, "is_admin": True, "created_at": datetime.now(UTC)}]
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("revoked_at", timestamp(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_user_id"), "api_tokens", ["user_id"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("actor_kind", small_enum(*ACTOR_KINDS, name="actorkind"), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", small_enum(*AUDIT_ACTIONS, name="auditaction"), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(
        op.f("ix_audit_events_actor_kind_actor"), "audit_events", ["actor_kind", "actor"]
    )

    # Owner: added empty, given to the bootstrap admin, then required.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column(
                "priority",
                small_enum(*JOB_PRIORITIES, name="jobpriority"),
                server_default="normal",
                nullable=False,
            )
        )
    admin_id = sa.select(users.c.id).where(users.c.name == BOOTSTRAP_ADMIN).scalar_subquery()
    jobs = sa.table("jobs", sa.column("owner_id", sa.Integer()))
    op.execute(jobs.update().values(owner_id=admin_id))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("owner_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(op.f("fk_jobs_owner_id_users"), "users", ["owner_id"], ["id"])
        batch.create_index(op.f("ix_jobs_owner_id"), ["owner_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(op.f("ix_jobs_owner_id"))
        batch.drop_constraint(op.f("fk_jobs_owner_id_users"), type_="foreignkey")
        batch.drop_column("priority")
        batch.drop_column("owner_id")
    op.drop_index(op.f("ix_audit_events_actor_kind_actor"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_api_tokens_user_id"), table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("users")
