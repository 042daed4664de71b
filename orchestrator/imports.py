"""Results measured elsewhere: test losses from a CSV or JSON of name, test_loss[, seed][, stack] join the
table as imported runs of an experiment, so published numbers and new runs sit in one view. Every row is
checked before anything is stored (plan_import), so a bad file imports nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from sqlalchemy.engine import Engine

from orchestrator import queue
from orchestrator.specs import BASELINE, Experiment, Intervention, SpecError, check_name
from trainer.rundir import Status


def read_results(path: str | Path) -> list[dict]:
    """Rows of name, test_loss and optionally seed and stack ("a+b"), from CSV or JSON (a list of objects).
    Any bad row is an error naming it (file:line, or the JSON item) and its value: nothing is imported then."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path} does not exist")
    try:
        if path.suffix == ".json":
            try:
                items = json.loads(path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as exc:
                raise SpecError(f"{path} is not valid JSON: {exc}") from None
            if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
                raise SpecError(f'{path} must hold a list of objects like {{"name": "baseline", "test_loss": 3.69}}')
            rows = [(f"{path} item {i}", r) for i, r in enumerate(items, 1)]
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
                reader = csv.DictReader(f)
                rows = [(f"{path}:{reader.line_num}", r) for r in reader]
        else:
            raise SpecError(f"{path}: import reads .csv or .json files")
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not UTF-8 text; save it as UTF-8 CSV or JSON") from None
    except csv.Error as exc:
        raise SpecError(f"{path} is not valid CSV: {exc}") from None
    out = []
    seen: set[tuple[str, int]] = set()
    for where, row in rows:
        if "name" not in row or "test_loss" not in row:
            columns = sorted(str(k) for k in row if k is not None)
            raise SpecError(f"{where}: needs 'name' and 'test_loss' (optional: 'seed', 'stack'), got {columns}")
        name = str(row["name"] if row["name"] is not None else "").strip()
        if not name:
            raise SpecError(f"{where}: the name is empty")
        value = row["test_loss"]
        try:
            loss = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            loss = math.nan
        if not (math.isfinite(loss) and loss > 0):
            raise SpecError(
                f"{where}: test_loss must be a finite positive number (a cross-entropy in nats), got {value!r}"
            )
        raw_seed = row.get("seed")
        try:
            seed = None if raw_seed in (None, "") else int(str(raw_seed).strip())
        except ValueError:
            seed = -1
        if seed is not None and seed < 0:
            raise SpecError(f"{where}: seed must be a whole number ≥ 0, got {raw_seed!r}")
        if seed is not None:
            if (name, seed) in seen:
                raise SpecError(f"{where}: a second row for {name!r} with seed {seed}; give each run its own seed")
            seen.add((name, seed))
        stack = [p for p in str(row.get("stack") or "").split("+") if p]
        out.append({"name": name, "test_loss": loss, "seed": seed, "stack": stack})
    if not out:
        raise SpecError(f"{path} holds no rows; it needs a header and rows of name,test_loss[,seed][,stack]")
    return out


def plan_import(path: str | Path, experiment: str, baseline: str = BASELINE) -> tuple[list[dict], Experiment]:
    """The rows of an import and the experiment spec they form, checked without touching any database."""
    try:
        check_name(experiment, "experiment")
    except ValueError as exc:
        raise SpecError(f"{exc}; name it with --experiment") from None
    rows = read_results(path)
    if baseline not in {r["name"] for r in rows}:
        names = sorted({r["name"] for r in rows})
        raise SpecError(
            f"{path} has no row named {baseline!r} to compare against (rows: {', '.join(names[:8])}"
            f"{', …' if len(names) > 8 else ''}); name the baseline row with --baseline"
        )
    interventions = {}
    for r in rows:
        if r["name"] != baseline:
            interventions[r["name"]] = Intervention(name=arm_name(r["name"]), stack=[arm_name(p) for p in r["stack"]])
    try:
        spec = Experiment(
            name=experiment, description=f"imported from {path}", interventions=list(interventions.values())
        )
    except ValueError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return rows, spec


def import_results(engine: Engine, path: str | Path, experiment: str, baseline: str = BASELINE) -> int:
    """Store imported results as finished runs of `experiment` (the row named `baseline` is the baseline)."""
    rows, spec = plan_import(path, experiment, baseline)
    seen: dict[str, int] = {}
    runs = []
    for r in rows:
        arm = BASELINE if r["name"] == baseline else arm_name(r["name"])
        seed = r["seed"] if r["seed"] is not None else seen.get(arm, 0)
        seen[arm] = seed + 1
        rid = "imp" + hashlib.sha256(json.dumps([experiment, arm, seed, r["test_loss"]]).encode()).hexdigest()[:13]
        runs.append(
            queue.Imported(
                id=rid,
                arm=arm,
                seed=seed,
                test_loss=r["test_loss"],
                result={
                    "imported": True,
                    "source": str(path),
                    "name": r["name"],
                    "test_loss": r["test_loss"],
                    "status": Status.SUCCEEDED.value,
                },
            )
        )
    queue.add_imported(engine, spec, str(path), runs)
    return len(rows)


def arm_name(name: str) -> str:
    """Names from a published table ("8xa100m40-gradient-clipping") as valid arm names (specs.check_name)."""
    arm = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.+=-") else "-" for ch in name)
    return arm.lstrip(".-").rstrip("-")[:200] or "unnamed"
