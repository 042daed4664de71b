"""Where a run trains: the node, and the Slurm job when its worker is a Slurm pilot.

Both are set when a launch's trainer starts (queue.start), so they name the latest placement of a run that
moved between nodes; `orch ls`, `orch logs` and MLflow's tags show them. A claim whose run trained on another
node that left no checkpoint visible here is handed back with a message (worker.py), not restarted from step
0; `node` is how it knows. `nodes` is how many nodes a run asks for (an experiment's `nodes`): only a worker
spanning as many nodes (a Slurm pilot of --nodes-per-job N) claims it.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("node", sa.String(200)))
        batch.add_column(sa.Column("slurm_job", sa.String(64)))
        batch.add_column(sa.Column("nodes", sa.Integer, nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name in ("nodes", "slurm_job", "node"):
            batch.drop_column(name)
