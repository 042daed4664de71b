"""How a study grows after its first submit: noise studies, more seeds where the answer is open, and
results imported from elsewhere.

- `noise`: repeat an experiment's baseline varying one source of randomness at a time — initialisation,
  data order, both, or nothing (the hardware's nondeterminism alone, which is all that the blog series'
  seven byte-identical repeats measured). Each becomes experiment "EXP.noise-VARY", shown as σ by source.
- `more_seeds`: add seeds only to arms whose verdict is still open and could still close with more runs
  (stats.could_decide), and to the baseline as far as they need; new runs jump the queue. Its looks are
  recorded on the experiment, whose verdicts become sequential tests (stats.sequential_alpha).
- `import_results`: test losses measured elsewhere (a CSV or JSON of name, test_loss[, seed][, stack]) join
  the table as imported runs, so published numbers and new runs sit in one view.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from sqlalchemy.engine import Engine

from orchestrator import queries, queue, stats
from trainer.rundir import Status
from orchestrator import table as tbl
from orchestrator.db import Run
from orchestrator.specs import (BASELINE, Experiment, Intervention, Looks, RunSpec, SpecError, check_name, run_id,
                                 seeded)

VARY = ("init", "data", "both", "none")


def _seed0_configs(engine: Engine, experiment: str) -> dict[str, dict]:
    """Per arm, the config of its first seed (lowest seed and data seed, repeat 0): the seed-0 template."""
    first: dict[str, Run] = {}
    for _, arm, r in queries.runs_of(engine, [experiment]):
        if (r.result or {}).get("imported"):
            continue
        if arm not in first or (r.seed, r.data_seed, r.repeat) < (first[arm].seed, first[arm].data_seed, first[arm].repeat):
            first[arm] = r
    return {arm: r.config for arm, r in first.items()}


def noise(engine: Engine, experiment: str, repeats: int, vary: str) -> queue.SubmitReport:
    """Queue `repeats` runs of the experiment's baseline varying `vary` only, as experiment EXP.noise-VARY."""
    if vary not in VARY:
        raise SpecError(f"--vary must be one of {', '.join(VARY)}, not {vary!r}")
    if repeats < 2:
        raise SpecError("a noise study needs at least 2 repeats to estimate a σ; use --repeats 8, say")
    parent = queries.spec(engine, experiment)
    base = _seed0_configs(engine, experiment).get(BASELINE)
    if base is None:
        raise SpecError(f"experiment {experiment!r} has no baseline runs to repeat")
    name = f"{experiment}{tbl.NOISE_SEP}{vary}"
    spec = Experiment(name=name, description=f"noise study of {experiment}: vary {vary}", preset=parent.preset,
                      base=parent.base, seeds=repeats, vary=vary)
    runs = []
    for s in range(repeats):
        cfg, repeat = seeded(base, vary, s, 0, 1, source=name)
        runs.append(RunSpec(run_id(cfg, repeat), name, BASELINE, cfg, repeat))
    return queue.submit(engine, spec, runs, source=f"orch noise {experiment} --vary {vary}")


def more_seeds(engine: Engine, experiment: str, max_seeds: int, alpha: float = 0.05, step: int = 1
               ) -> tuple[queue.SubmitReport, dict[str, str]]:
    """Queue more seeds where a verdict is open and could still close; return what was queued and, per arm,
    why it got more seeds or not."""
    if max_seeds < 2:
        raise SpecError("--max-seeds must be at least 2 (a verdict needs two runs per side)")
    spec = queries.spec(engine, experiment)
    if tbl.NOISE_SEP in experiment:
        parent = experiment.split(tbl.NOISE_SEP)[0]
        raise SpecError(f"{experiment!r} is a noise study (baseline repeats, no interventions to decide); "
                        f"add repeats with `orch noise {parent} --repeats N`, or seeds to {parent!r} itself")
    runs = queries.runs_of(engine, [experiment])
    if not runs:
        raise SpecError(f"experiment {experiment!r} has no runs yet")
    # This call looks at the verdicts, and may look again after every seed it adds: from now on they are
    # sequential tests (stats.sequential_alpha), from the runs per arm at the first look up to max_seeds.
    done: dict[str, int] = {}
    for _, arm, r in runs:
        done[arm] = done.get(arm, 0) + tbl.finished(r)
    first = min((n for arm, n in done.items() if arm != BASELINE), default=2)
    spec.looks = Looks(first=max(2, min(first, max_seeds)), last=max_seeds).union(spec.looks)
    queue.submit(engine, spec, [], source=None)  # records the looks; submit keeps any stored ones too
    [board] = [b for b in tbl.build(runs, {experiment: spec}, alpha) if b.experiment == experiment]
    templates = _seed0_configs(engine, experiment)
    targets: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for row in board.rows:
        if row.arm == BASELINE or row.imported:
            continue
        have = row.n + row.pending
        c = stats.Comparison(row.n, row.mean, row.std, row.improvement, row.ci_low, row.ci_high, row.p_value,
                             row.test, row.verdict or stats.UNVERIFIED, row.level or alpha)
        if row.pending:
            reasons[row.arm] = f"{row.pending} run(s) still pending"
        elif row.verdict in (stats.BETTER, stats.WORSE):
            reasons[row.arm] = f"decided: {row.verdict} (p = {row.p_value:.3g} < {row.level:.3g}, the sequential level)"
        elif have >= max_seeds:
            reasons[row.arm] = f"at --max-seeds {max_seeds}: {row.verdict}"
        elif not stats.could_decide(c, max_seeds):
            reasons[row.arm] = f"decided: within noise (even {max_seeds} seeds could not exclude zero)"
        else:
            targets[row.arm] = min(max_seeds, max(2, have + step))
            reasons[row.arm] = f"open: {row.verdict}, adding seeds up to {targets[row.arm]}"
    if targets:
        base_have = next((r.n + r.pending for r in board.rows if r.arm == BASELINE), 0)
        targets[BASELINE] = max(base_have, *targets.values())
    runs: list[RunSpec] = []
    for arm, target in targets.items():
        if arm not in templates:
            continue
        for s in range(target):
            cfg, repeat = seeded(templates[arm], spec.vary if spec.vary != "none" else "init", s, 0, 1, source=arm)
            runs.append(RunSpec(run_id(cfg, repeat), experiment, arm, cfg, repeat))
    if not runs:
        return queue.SubmitReport(), reasons
    spec.seeds = max(spec.seeds, *targets.values())
    return queue.submit(engine, spec, runs, source=None, priority=1), reasons


# ---------------------------------------------------------------------------------------------------------
# Imported results.

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
                raise SpecError(f"{path} must hold a list of objects like {{\"name\": \"baseline\", \"test_loss\": 3.69}}")
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
            raise SpecError(f"{where}: test_loss must be a finite positive number (a cross-entropy in nats), "
                            f"got {value!r}")
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
        raise SpecError(f"{path} has no row named {baseline!r} to compare against (rows: {', '.join(names[:8])}"
                        f"{', …' if len(names) > 8 else ''}); name the baseline row with --baseline")
    interventions = {}
    for r in rows:
        if r["name"] != baseline:
            interventions[r["name"]] = Intervention(name=_arm_name(r["name"]), stack=[_arm_name(p) for p in r["stack"]])
    try:
        spec = Experiment(name=experiment, description=f"imported from {path}", interventions=list(interventions.values()))
    except ValueError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return rows, spec


def import_results(engine: Engine, path: str | Path, experiment: str, baseline: str = BASELINE) -> int:
    """Store imported results as finished runs of `experiment` (the row named `baseline` is the baseline)."""
    rows, spec = plan_import(path, experiment, baseline)
    seen: dict[str, int] = {}
    runs = []
    for r in rows:
        arm = BASELINE if r["name"] == baseline else _arm_name(r["name"])
        seed = r["seed"] if r["seed"] is not None else seen.get(arm, 0)
        seen[arm] = seed + 1
        rid = "imp" + hashlib.sha256(json.dumps([experiment, arm, seed, r["test_loss"]]).encode()).hexdigest()[:13]
        runs.append(queue.Imported(id=rid, arm=arm, seed=seed, test_loss=r["test_loss"], result={
            "imported": True, "source": str(path), "name": r["name"], "test_loss": r["test_loss"], "status": Status.SUCCEEDED.value}))
    queue.add_imported(engine, spec, str(path), runs)
    return len(rows)


def _arm_name(name: str) -> str:
    """Names from a published table ("8xa100m40-gradient-clipping") as valid arm names (specs.check_name)."""
    arm = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.+=-") else "-" for ch in name)
    return arm.lstrip(".-").rstrip("-")[:200] or "unnamed"
