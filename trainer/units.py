"""Numbers for people, shared by the trainer's data preparation and the orchestrator's progress lines
(which may import the trainer's plain modules, never the other way round)."""

from __future__ import annotations


def duration(s: float) -> str:
    """Seconds for people: "45 s", "3 min 05 s", "2 h 10 min"."""
    s = round(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
