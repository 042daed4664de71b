"""Alembic environment: runs migrations on the engine handed over by orchestrator.migrations."""

from alembic import context

from orchestrator.db import Base
from orchestrator.migrations import VERSION_TABLE

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(
        connection=connection, target_metadata=Base.metadata, render_as_batch=True, version_table=VERSION_TABLE
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
