"""Alembic migrations of the runs database, driven from Python (no alembic.ini needed).

`ensure_current` is called on every connect: an empty database is created at the head revision; one at an
older revision is refused with the command that upgrades it (`orch db upgrade`), so that workers of two orch
versions never write one schema differently; a newer one is refused with a request to upgrade orch.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory


def alembic_config(engine: sa.Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["engine"] = engine
    return cfg


def head(engine: sa.Engine) -> str:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


# Optuna keeps its own Alembic history in the same database (`orch sweep` stores studies beside the runs),
# in the default table "alembic_version"; ours has a name of its own.
VERSION_TABLE = "orch_alembic_version"


def current(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: sa.Engine) -> tuple[str | None, str]:
    before = current(engine)
    command.upgrade(alembic_config(engine), "head")
    return before, head(engine)


def ensure_current(engine: sa.Engine, create: bool = True) -> None:
    from orchestrator.db import SchemaError

    url = engine.url.render_as_string(hide_password=True)
    rev, want = current(engine), head(engine)
    if rev == want:
        return
    if rev is None:
        tables = [t for t in sa.inspect(engine).get_table_names() if t in ("runs", "memberships", "experiments")]
        if tables:
            raise SchemaError(
                f"{url} holds orch's tables ({', '.join(sorted(tables))}) but no orch schema version; "
                "point --db at a new database file or an empty PostgreSQL database"
            )
        if create:
            upgrade(engine)
        return
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config(engine)).walk_revisions()}
    if rev not in known:
        raise SchemaError(f"{url} was written by a newer orch (schema {rev}); upgrade orch: pip install -U orch")
    raise SchemaError(
        f"{url} has schema {rev}, this orch needs {want}: back it up, then run `orch db upgrade --db {url}`"
    )
