"""Which code ran: the git commit (stdlib only, so a launcher learns it without importing torch)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the code that ran (ORCH_GIT_COMMIT wins: a launcher may know it better)."""
    if os.environ.get("ORCH_GIT_COMMIT"):
        return os.environ["ORCH_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
