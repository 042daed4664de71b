"""Named leases in the database: one holder at a time, kept by beating, lost to the next taker once the
beats stop. One sweep driver per sweep ("sweep:<name>"), one MLflow sender per finished run ("track:<id>").
The clock is the database's, so holders on machines with skewed clocks agree on who is late."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from orchestrator.db import Lease, db_now


def take(engine: Engine, name: str, holder: str, grace_s: float) -> str | None:
    """Take or renew the lease `name` for `holder`. Returns None when `holder` holds it now, or a line
    saying who does: a holder keeps the lease while it beats at least every `grace_s` seconds (database
    clock), and loses it to the next taker once it has not."""
    for _ in range(3):  # two first takers on PostgreSQL: one insert wins, the other reads it next pass
        try:
            with engine.begin() as conn:
                now = conn.execute(sa.select(db_now())).scalar_one()
                row = conn.execute(
                    sa.select(Lease.holder, Lease.heartbeat_at).where(Lease.name == name).with_for_update()
                ).first()
                if row is None:
                    conn.execute(sa.insert(Lease).values(name=name, holder=holder, heartbeat_at=now))
                    return None
                if row.holder == holder or row.heartbeat_at < now - grace_s:
                    conn.execute(sa.update(Lease).where(Lease.name == name).values(holder=holder, heartbeat_at=now))
                    return None
                return f"{row.holder} (last beat {now - row.heartbeat_at:.0f} s ago)"
        except sa.exc.IntegrityError:
            continue
    raise RuntimeError(f"could not take or read lease {name!r}")


def release(engine: Engine, name: str, holder: str) -> None:
    """Give the lease up (a clean exit), so that a standby takes over at once rather than after the grace."""
    with engine.begin() as conn:
        conn.execute(sa.delete(Lease).where(Lease.name == name, Lease.holder == holder))
