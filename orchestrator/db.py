"""The runs database: tables, engine set-up for SQLite and PostgreSQL, the database clock, schema versions.

SQLite (`results.db`, the default) runs in WAL mode, and every transaction starts with BEGIN IMMEDIATE so
that two workers never both read a run as queued and then both try to take it; PostgreSQL uses its own
row locks (see queue.py). Times are seconds since the epoch *on the database's clock* (Optuna's heartbeat
design): workers on machines whose clocks disagree still agree on whose heartbeat is stale.

The schema is versioned by Alembic (orchestrator/migrations/). A new database is created at the newest
revision; a database written by an older orch is refused with the command that migrates it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import FunctionElement

DEFAULT_URL = "sqlite:///results.db"
ENV_URL = "ORCH_DB"


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One training run, shared by every experiment whose spec expands to the same config."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    data_seed: Mapped[int] = mapped_column(Integer)
    repeat: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200))
    run_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)  # the tail of stderr of the last failed attempt
    result: Mapped[dict | None] = mapped_column(JSON)  # result.json as the trainer wrote it
    test_loss: Mapped[float | None] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer)  # progress, for `orch status`
    train_loss: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    val_curve: Mapped[list | None] = mapped_column(JSON)  # [[step, val_loss], …] so far, for pruning
    stop: Mapped[str | None] = mapped_column(String(16))  # a stop request ("pruned") for the run's worker

    # In queue.claim's order (migration 0003), so a claim reads the index instead of sorting the queue.
    __table_args__ = (sa.Index("ix_runs_claim", "state", sa.text("priority DESC"), "created_at", "id"),)


class Membership(Base):
    """Which runs an experiment consists of, and as which arm (baseline or an intervention)."""

    __tablename__ = "memberships"
    experiment: Mapped[str] = mapped_column(String(200), primary_key=True)
    arm: Mapped[str] = mapped_column(String(200), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True, index=True)


class Experiment(Base):
    __tablename__ = "experiments"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    spec: Mapped[dict] = mapped_column(JSON)  # the Experiment spec as last submitted
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Lease(Base):
    """Which process drives a sweep (queue.take_lease): one holder at a time, beating on the database clock;
    a holder whose beats stop is replaced once the grace period has passed."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    heartbeat_at: Mapped[float] = mapped_column(Float)


# ---------------------------------------------------------------------------------------------------------
# The database clock.

class db_now(FunctionElement):
    """Seconds since the epoch, fractional, according to the database server."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _now_sqlite(element, compiler, **kw):
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _now_postgresql(element, compiler, **kw):
    return "EXTRACT(EPOCH FROM clock_timestamp())::float8"


# ---------------------------------------------------------------------------------------------------------
# Engines.

class SchemaError(RuntimeError):
    """A database whose schema this orch cannot use as it is."""


def resolve_url(url: str | None = None) -> str:
    return url or os.environ.get(ENV_URL) or DEFAULT_URL


def connect(url: str | None = None, *, create: bool = True) -> Engine:
    """An engine for the URL (or $ORCH_DB, or results.db), with the schema checked or created."""
    url = resolve_url(url)
    try:
        sa_url = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise SchemaError(f"{url!r} is not a database URL; use e.g. sqlite:///results.db or "
                          "postgresql+psycopg://user@host/dbname") from None
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            if not create and not Path(sa_url.database).exists():
                raise SchemaError(f"no database at {sa_url.database}: queue runs first with "
                                  "`orch submit experiments/quickstart.py`, or point --db at an existing one")
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(sa_url, connect_args={"timeout": 60, "isolation_level": None})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    elif sa_url.get_backend_name() == "postgresql":
        if sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we install
        engine = sa.create_engine(sa_url, pool_pre_ping=True)
    else:
        raise SchemaError(f"unsupported database {sa_url.get_backend_name()!r}: use SQLite or PostgreSQL")
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        raise SchemaError(f"cannot connect to {sa_url.render_as_string(hide_password=True)}: "
                          f"{str(exc.orig).strip().splitlines()[0]}") from None
    from orchestrator import migrations

    with init_lock(engine):  # workers started together must not create the schema twice
        migrations.ensure_current(engine, create=create)
    return engine


@contextmanager
def init_lock(engine: Engine):
    """Serialise schema creation between processes: a lock file beside a SQLite database, an advisory
    lock on PostgreSQL."""
    if engine.url.get_backend_name() == "sqlite":
        if not engine.url.database or engine.url.database == ":memory:":
            yield
            return
        with file_lock(Path(engine.url.database)):
            yield
    else:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_advisory_lock(7414023)")  # any constant of our own
            try:
                yield
            finally:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(7414023)")
                conn.commit()


@contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path`.lock (flock: released by the kernel if this process dies)."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sqlite_on_connect(dbapi_conn, record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at every checkpoint of the WAL; safe with WAL
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
