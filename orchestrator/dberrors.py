"""Database errors a user can act on, as one line each, and passwords kept out of every message.

A damaged SQLite file (random bytes, a copy cut short) fails on its first read, which may come in the middle
of a command; a PostgreSQL server can go away at any moment. db.connect and the CLI's command group both turn
those into one line with the fix, never touching the file; anything else from the database is a bug and
keeps its traceback.
"""

from __future__ import annotations

import re

import sqlalchemy as sa

# What sqlite3 says about a file that is not (or no longer) a whole SQLite database.
CORRUPT = ("not a database", "malformed", "file is encrypted")


def redact(text: str) -> str:
    """`text` with the password of any URL in it (scheme://user:PASSWORD@host, ?password=…) replaced by ***."""
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)


def reason(exc: BaseException) -> str:
    """The driver's own first line (sqlite3 / psycopg), without SQLAlchemy's statement and background link."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return redact(lines[0] if lines else type(orig).__name__)


def corrupt(url: sa.engine.URL, exc: BaseException) -> bool:
    import sqlite3

    orig = getattr(exc, "orig", None)
    return (
        url.get_backend_name() == "sqlite"
        and isinstance(orig, sqlite3.DatabaseError)
        and any(c in str(orig).lower() for c in CORRUPT)
    )


def describe(exc: BaseException, url: sa.engine.URL | None) -> str | None:
    """The one-line message for a database error the user can fix, or None (a bug: let it show)."""
    if not isinstance(exc, sa.exc.DBAPIError) or url is None:
        return None
    if corrupt(url, exc):
        return f"{url.database} is not a valid SQLite database ({reason(exc)}): move it aside or restore a backup"
    if isinstance(exc, sa.exc.OperationalError):
        return (
            f"database {url.render_as_string(hide_password=True)} failed: {reason(exc)}; check that it is "
            "reachable and has space, then run the command again"
        )
    return None
