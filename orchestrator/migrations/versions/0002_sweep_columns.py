"""Runs: the validation curve (for pruning from any machine) and a stop request (pruning, cancelling).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("val_curve", sa.JSON()))
        batch.add_column(sa.Column("stop", sa.String(16)))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("stop")
        batch.drop_column("val_curve")
