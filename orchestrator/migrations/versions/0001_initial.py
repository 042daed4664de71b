"""Initial schema: runs, memberships, experiments.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("data_seed", sa.Integer(), nullable=False),
        sa.Column("repeat", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200)),
        sa.Column("run_dir", sa.Text()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float()),
        sa.Column("heartbeat_at", sa.Float()),
        sa.Column("finished_at", sa.Float()),
        sa.Column("exit_code", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("result", sa.JSON()),
        sa.Column("test_loss", sa.Float()),
        sa.Column("step", sa.Integer()),
        sa.Column("train_loss", sa.Float()),
        sa.Column("tokens_per_s", sa.Float()),
        sa.Column("total_steps", sa.Integer()),
        sa.Column("mlflow_run_id", sa.String(64)),
    )
    op.create_index("ix_runs_state", "runs", ["state"])
    op.create_index("ix_runs_claim", "runs", ["state", "priority", "created_at"])
    op.create_table(
        "memberships",
        sa.Column("experiment", sa.String(200), primary_key=True),
        sa.Column("arm", sa.String(200), primary_key=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), primary_key=True),
    )
    op.create_index("ix_memberships_run_id", "memberships", ["run_id"])
    op.create_table(
        "experiments",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("source", sa.Text()),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("experiments")
    op.drop_table("memberships")
    op.drop_table("runs")
