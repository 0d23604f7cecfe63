"""AWP, EMA, MART and the epsilon warm-up (issue 12): a trial says which weights its numbers are
of (``trained``, or ``ema``: the moving average of the weights), and each epoch the training
epsilon it used (``train_epsilon``, below the spec's during a warm-up).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("weights", sa.String(length=16), nullable=True))
    with op.batch_alter_table("trial_metrics") as batch:
        batch.add_column(sa.Column("train_epsilon", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trial_metrics") as batch:
        batch.drop_column("train_epsilon")
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("weights")
