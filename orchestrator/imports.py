"""Results measured elsewhere: test losses from a CSV or JSON of name, test_loss[, seed][, stack] join the
table as imported runs of an experiment, so published numbers and new runs sit in one view. Every row is
checked before anything is stored (plan_import), so a bad file imports nothing.

Imports never invent structure. Every row is its own run and counts in n: rows with the same name (and the
same seed, or no seed) are repeats, never merged. Only a given seed pairs runs: an arm's seed-3 row pairs with
the baseline's seed-3 row (and the k-th repeat of a seed with the baseline's k-th), so arms that share their
seeds get a paired test. Rows without a seed pair with nothing, and their arms get Welch's test; a seed is
never made up from the order of the rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from sqlalchemy.engine import Engine

from orchestrator import submission
from orchestrator.specs import BASELINE, Experiment, Intervention, SpecError, check_name
from trainer.rundir import Status


def read_results(path: str | Path) -> list[dict]:
    """Rows of name, test_loss and optionally seed and stack ("a+b"), from CSV or JSON (a list of objects),
    in file order. A row without a seed has seed None; several rows may share a name and seed (repeats).
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
    """Store imported results as finished runs of `experiment` (the row named `baseline` is the baseline); one
    run per row, so the count returned is the number of this file's runs in the experiment afterwards. The
    same file imported again adds nothing: a run's id hashes its experiment, arm, seed, test loss (and repeat)."""
    rows, spec = plan_import(path, experiment, baseline)
    runs = imported_runs(rows, str(path), experiment, baseline)
    submission.add_imported(engine, spec, str(path), runs)
    return len(runs)


def imported_runs(
    rows: list[dict], source: str, experiment: str, baseline: str = BASELINE
) -> list[submission.Imported]:
    """One run per row, each with its own id. `repeat` counts the arm's earlier rows with the same given seed
    (without a seed: the arm's earlier seedless rows); result["seed"] is the given seed or None, and only a
    given seed pairs runs in the table (table.pairing_key). Run.seed, a required column, holds the given seed,
    or for a seedless row an index within its arm that pairs nothing."""
    next_index: dict[str, int] = {}  # the seedless row's Run.seed, numbered as before seed-aware imports
    repeats: dict[tuple[str, int | None], int] = {}
    ids: set[str] = set()
    runs = []
    for r in rows:
        arm = BASELINE if r["name"] == baseline else arm_name(r["name"])
        given = r["seed"]
        seed = given if given is not None else next_index.get(arm, 0)
        next_index[arm] = seed + 1
        repeat = repeats.get((arm, given), 0)
        repeats[(arm, given)] = repeat + 1
        # The id of a given seed's first row and of every seedless row is the one imports had before repeats
        # were kept, so a file imported by older code is not stored twice; further repeats hash their number.
        key: list = [experiment, arm, seed, r["test_loss"]]
        if given is not None and repeat:
            key.append(repeat)
        rid = _run_id(key)
        while rid in ids:  # a seedless row whose index equals another row's given seed, at the same loss
            key.append(len(ids))
            rid = _run_id(key)
        ids.add(rid)
        runs.append(
            submission.Imported(
                id=rid,
                arm=arm,
                seed=seed,
                repeat=repeat,
                test_loss=r["test_loss"],
                result={
                    "imported": True,
                    "source": source,
                    "name": r["name"],
                    "seed": given,
                    "test_loss": r["test_loss"],
                    "status": Status.SUCCEEDED.value,
                },
            )
        )
    return runs


def _run_id(key: list) -> str:
    return "imp" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:13]


def arm_name(name: str) -> str:
    """Names from a published table ("8xa100m40-gradient-clipping") as valid arm names (specs.check_name)."""
    arm = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.+=-") else "-" for ch in name)
    return arm.lstrip(".-").rstrip("-")[:200] or "unnamed"
