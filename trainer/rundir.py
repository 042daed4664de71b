"""The run directory: the whole contract between the trainer and whoever launched it (files, not calls).

    runs/<id>/config.json       the resolved TrainConfig (written by the launcher, or by the trainer for --preset)
    runs/<id>/metrics.jsonl     one JSON object per event, appended and flushed as training goes
    runs/<id>/checkpoints/      step_XXXXXXXX.pt, each written atomically; a relaunch resumes from the newest
    runs/<id>/samples.json      a succeeded run's completions of sample.prompts, just before result.json
                                (trainer/sample.py: prompt, kind greedy/sampled, temperature, seed, text, tokens)
    runs/<id>/result.json       written last, atomically: how the run ended and what it measured
    runs/<id>/STOP              created by the launcher: checkpoint and exit ("pruned" inside = pruned)
    runs/<id>/trainer.lock      held by the one trainer of the directory (trainer/runlock.py)
    runs/<id>/init_from.json    a run.init_from run's source: checkpoint, sha256, step (trainer/init_from.py)

metrics.jsonl is append-only so a reader can follow it by byte offset. After a resume the trainer appends
{"event": "resume", "step": N}: events of steps > N written before it belong to the lost attempt and are
superseded by the ones that follow. This module is stdlib-only so an orchestrator can import it cheaply.
"""

from __future__ import annotations

import json
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
SAMPLES = "samples.json"
STOP = "STOP"
CHECKPOINTS = "checkpoints"


class Status(str, Enum):
    SUCCEEDED = "succeeded"
    DIVERGED = "diverged"  # a NaN or infinite loss; result.json names the step
    PREEMPTED = "preempted"  # STOP file or SIGTERM: checkpointed, relaunch to resume
    PRUNED = "pruned"  # STOP file containing "pruned": checkpointed, not to be resumed
    # Written by the trainer only for an error that no retry can fix (bad config, missing data), with the
    # message in "error"; a crash leaves no result.json, and a launcher may retry it.
    FAILED = "failed"

    def __str__(self) -> str:  # messages and f-strings read "preempted", not "Status.PREEMPTED"
        return self.value


# Exit codes, so a launcher can tell the endings apart without parsing anything (sysexits.h style).
EXIT_CODES = {Status.SUCCEEDED: 0, Status.FAILED: 2, Status.DIVERGED: 65, Status.PREEMPTED: 75, Status.PRUNED: 76}
# No space left for the run directory (EX_IOERR): no result.json can be written either. Not the run's
# fault, so a launcher retries it without counting an attempt, once space is free.
EXIT_NO_SPACE = 74
NO_SPACE_LINE = "error: no space left"  # how the trainer's one-line message starts (for torchrun's logs)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for the whole team to read
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_stop(run_dir: str | os.PathLike) -> Status | None:
    """PRUNED if the STOP file says "pruned", PREEMPTED if it exists at all, else None."""
    try:
        text = (Path(run_dir) / STOP).read_text().strip().lower()
    except FileNotFoundError:
        return None
    return Status.PRUNED if text == "pruned" else Status.PREEMPTED


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of the attempt that counts: what a resume superseded is dropped."""
    events: list[dict[str, Any]] = []
    path = Path(run_dir) / METRICS
    if not path.exists():
        return events
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a full disk or a kill; the next launch ended it
            continue
        if event.get("event") == "resume":
            events = [e for e in events if e.get("step", 0) <= event["step"]]
        events.append(event)
    return events


def read_events(path: Path, offset: int, until: int | None = None) -> tuple[list[dict], int]:
    """Complete JSON lines of `path` from byte `offset` (to `until`), and the offset after them. A line still
    being written waits for the next read; a damaged line (a full disk, say) is skipped, not fatal."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read() if until is None else f.read(until - offset)
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    events = []
    for line in chunk[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + end


class Metrics:
    """The writer of metrics.jsonl: appended and flushed one event at a time, by rank 0 only (elsewhere a no-op)."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", buffering=1) if enabled else None
        if self.file and self.file.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # an earlier attempt died mid-line (a full disk, a kill): end that line, keep ours whole
                self.file.write("\n")

    def log(self, **event: Any) -> None:
        if self.file:
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()


def checkpoint_paths(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of an interrupted write are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS
    return sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
