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
    # Launches (migration 0005): every claim is launch number `launches`; its id, "<run id>.<n>", is passed
    # to the trainer and written into result.json, so an ending is matched to the launch that wrote it.
    launches: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    open_launch: Mapped[int | None] = mapped_column(Integer)  # started, its ending not yet accounted for
    tracked: Mapped[str | None] = mapped_column(String(16))  # the final state MLflow was closed with
    # Where the latest launch's trainer started (migration 0006): its node, and its Slurm job if a pilot's.
    node: Mapped[str | None] = mapped_column(String(200))
    slurm_job: Mapped[str | None] = mapped_column(String(64))
    # Nodes it trains on (migration 0006): only a worker spanning as many nodes claims it (queue.claim).
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    def launch_id(self, n: int | None = None) -> str:
        return f"{self.id}.{self.launches if n is None else n}"

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
    """Which process drives a sweep (leases.take): one holder at a time, beating on the database clock;
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


def connect(url: str | None = None, *, create: bool = True, check_schema: bool = True) -> Engine:
    """An engine for the URL (or $ORCH_DB, or results.db), with the schema checked or created (check_schema
    False: `orch db upgrade`, which migrates what this would refuse). Every problem a user can fix — a bad
    URL, no server, a damaged file, no database yet — is a SchemaError of one line, with no password in it;
    nothing is written to a database that fails these checks."""
    from orchestrator import dberrors

    url = resolve_url(url)
    try:
        sa_url = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise SchemaError(
            f"{dberrors.redact(url)!r} is not a database URL; use e.g. sqlite:///results.db or "
            "postgresql+psycopg://user@host/dbname"
        ) from None
    shown = sa_url.render_as_string(hide_password=True)
    try:
        if sa_url.get_backend_name() == "sqlite":
            if sa_url.database and sa_url.database != ":memory:":
                if not create and not Path(sa_url.database).exists():
                    raise SchemaError(
                        f"no database at {sa_url.database}: queue runs first with "
                        "`orch submit experiments/quickstart.py`, or point --db at an existing one"
                    )
                if not create and Path(sa_url.database).is_file() and Path(sa_url.database).stat().st_size == 0:
                    # Opening it would write SQLite's header (WAL mode) into a file only meant to be read.
                    raise SchemaError(
                        f"{sa_url.database} is empty, no orch database yet: queue runs first with "
                        "`orch submit experiments/quickstart.py`, or point --db at an existing one"
                    )
                if Path(sa_url.database).is_dir():
                    raise SchemaError(
                        f"{sa_url.database} is a directory; point --db at a database file, e.g. "
                        f"sqlite:///{Path(sa_url.database) / 'results.db'}"
                    )
                Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(sa_url, connect_args={"timeout": 60, "isolation_level": None})
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        elif sa_url.get_backend_name() == "postgresql":
            if sa_url.drivername == "postgresql":
                sa_url = sa_url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we install
            engine = sa.create_engine(sa_url, pool_pre_ping=True)
        else:
            raise SchemaError(
                f"unsupported database {sa_url.get_backend_name()!r} in {shown}: use SQLite "
                "(sqlite:///results.db) or PostgreSQL (postgresql+psycopg://user@host/dbname)"
            )
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise SchemaError(
            f"no driver for {sa_url.drivername!r} ({dberrors.redact(str(exc))}); use sqlite:/// or "
            "postgresql+psycopg://"
        ) from None
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        if dberrors.corrupt(sa_url, exc):
            raise SchemaError(dberrors.describe(exc, sa_url)) from None
        raise SchemaError(f"cannot connect to {shown}: {dberrors.reason(exc)}") from None
    except TypeError as exc:  # an option in the URL's query that the driver does not take
        raise SchemaError(f"cannot connect to {shown}: {dberrors.redact(str(exc))}") from None
    if not check_schema:
        return engine
    from orchestrator import migrations

    try:
        with init_lock(engine):  # workers started together must not create the schema twice
            migrations.ensure_current(engine, create=create)
        if not create and migrations.current(engine) is None:
            raise SchemaError(
                f"{shown} holds no orch database yet: queue runs first with "
                "`orch submit experiments/quickstart.py`, or point --db at an existing one"
            )
    except sa.exc.DBAPIError as exc:
        message = dberrors.describe(exc, sa_url)
        if message is None:
            raise
        raise SchemaError(message) from None
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
