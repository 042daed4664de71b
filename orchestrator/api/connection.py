"""Opening the runs database for the API, and the one-line message for any error a user can fix.

Every API function takes `db`: an SQLAlchemy URL, an Engine already open, or None for $ORCH_DB (default
sqlite:///results.db). A URL given as a value must not hold a password: a command line is visible to every
user of the machine (`ps`, /proc) and a notebook gets shared, while libpq reads ~/.pgpass and $PGPASSWORD,
and $ORCH_DB may hold the whole URL.
"""

from __future__ import annotations

import re
import sys

from sqlalchemy.engine import Engine

# A run id is 16 hex digits (an imported one: imp + 13); a prefix must look like one, not like a LIKE pattern.
RUN_PREFIX = re.compile(r"[0-9a-z]{1,16}")
# The error classes whose messages are written for users (the module, the class). Looked up only in modules
# already imported: a command that never loaded one cannot have raised it.
USER_ERRORS = (
    ("orchestrator.specs", "SpecError"),
    ("trainer.config", "ConfigError"),
    ("orchestrator.db", "SchemaError"),
    ("trainer.data", "DataError"),
)
# The database this process opened last: an error found in the middle of a command (a damaged page, a
# server gone) is described with its URL.
opened: dict = {}


def connect(db: str | Engine | None = None, *, create: bool = False, check_schema: bool = True) -> Engine:
    """The runs database; only what writes runs (submit, worker, import, sweep) may create it."""
    from orchestrator import db as database

    if isinstance(db, Engine):
        return db
    refuse_password(db)
    engine = database.connect(db, create=create, check_schema=check_schema)
    opened["url"] = engine.url
    return engine


def refuse_password(db: str | Engine | None) -> None:
    import sqlalchemy as sa

    from orchestrator.dberrors import redact

    if db is None or isinstance(db, Engine):
        return
    try:
        url = sa.engine.make_url(db)
        has_password = bool(url.password) or "password" in {k.lower() for k in url.query}
    except (sa.exc.ArgumentError, ValueError):  # connect() says what is wrong with it, unless it shows a password
        has_password = redact(db) != db
    if has_password:
        raise ValueError(
            "--db holds a password, which anyone on this machine can read in `ps`: put the password "
            "in ~/.pgpass or $PGPASSWORD (libpq reads both), or in $ORCH_DB, not on the command line"
        )


def user_message(exc: BaseException) -> str | None:
    """The one line to show for an error a user can fix (a bad file, a damaged database, a server gone), with
    no password in it; None for anything else, which is a bug and keeps its traceback."""
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return str(exc)
    if "sqlalchemy" in sys.modules:
        from orchestrator import dberrors

        for e in (exc, exc.__cause__):  # Optuna wraps SQLAlchemy's errors in its own
            message = e is not None and dberrors.describe(e, opened.get("url"))
            if message:
                return message
    return None


def at_least(option: str, value: float, minimum: float = 1, example: str = "") -> None:
    if not value >= minimum:  # `not >=` also refuses NaN
        raise ValueError(
            f"{option} must be at least {minimum:g}, not {value:g}" + (f"; e.g. {option} {example}" if example else "")
        )


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be between 0 and 1, e.g. 0.05, not {alpha}")


def check_data(configs) -> None:
    """The runs' data directories, checked here unless the data lives only on the worker nodes."""
    from orchestrator import runspec, specs

    try:
        runspec.check_data(configs)
    except specs.SpecError as exc:
        raise specs.SpecError(f"{exc} (or pass --no-check-data if the data lives only on the worker nodes)") from None
