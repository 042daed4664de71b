"""Launches and the tracking outbox.

- `launches` counts the times a run was handed to a trainer; `open_launch` is the launch whose ending is not
  accounted for yet (set by a claim, cleared when its ending is recorded); `lost_launch` is the one a dead
  worker left open, judged by the next launcher from that launch's own result.json (queue.judge_lost).
  Preemption then costs no attempt even when the worker that saw it died (issue 8).
- `tracked` is the final state MLflow has been closed with; a finished run whose `tracked` differs from its
  state still has tracking to send (orchestrator/outbox.py). Runs finished before this revision are taken as
  settled.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FINAL = ("succeeded", "failed", "diverged", "cancelled", "pruned")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("launches", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("open_launch", sa.Integer()))
        batch.add_column(sa.Column("lost_launch", sa.Integer()))
        batch.add_column(sa.Column("tracked", sa.String(16)))
    op.execute(sa.text("UPDATE runs SET launches = attempts"))
    op.execute(sa.text("UPDATE runs SET tracked = state WHERE state IN ('" + "', '".join(FINAL) + "')"))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name in ("tracked", "lost_launch", "open_launch", "launches"):
            batch.drop_column(name)
