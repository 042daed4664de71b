"""Launches and the tracking outbox.

- `launches` counts the claims of a run (launch ids are "<run id>.<n>"); `open_launch` is the launch whose
  trainer started and whose ending is not accounted for yet (set by queue.start, cleared when its ending is
  recorded). One that a dead worker left open is judged by the next launcher from that launch's own
  result.json (queue.judge_lost): preemption costs no attempt even when the worker that saw it died.
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
        batch.add_column(sa.Column("tracked", sa.String(16)))
    op.execute(sa.text("UPDATE runs SET launches = attempts"))
    # A run training during the upgrade has a started launch: open, so its ending is judged if it is lost.
    op.execute(sa.text("UPDATE runs SET open_launch = launches WHERE state = 'running'"))
    op.execute(sa.text("UPDATE runs SET tracked = state WHERE state IN ('" + "', '".join(FINAL) + "')"))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name in ("tracked", "open_launch", "launches"):
            batch.drop_column(name)
    # SQLite's batch mode rebuilds the table and loses the DESC of migration 0003's index: put it back.
    op.drop_index("ix_runs_claim", table_name="runs")
    op.create_index("ix_runs_claim", "runs", ["state", sa.text("priority DESC"), "created_at", "id"])
